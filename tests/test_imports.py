"""The import graph: no cycles between minitune's modules, and plain LoRA without bitsandbytes."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """module -> the minitune modules it imports (at any level of the file, lazily or not)."""
    graph = {}
    for path in sorted((ROOT / "minitune").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minitune"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("minitune")}
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep not in graph or dep == "minitune":  # the package __init__ only re-exports
                continue
            if state.get(dep) == 1:
                return trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
            if state.get(dep) is None:
                found = visit(dep, trail + [dep])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if state.get(start) is None:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycles_between_library_modules():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the library
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_plain_lora_trains_without_bitsandbytes():
    # None in sys.modules makes `import bitsandbytes` raise ImportError, as on a machine without it
    code = """
import sys
sys.modules["bitsandbytes"] = None
import torch
from minitune import MinituneError
from minitune.lora import LoRAConfig, apply_lora, lora_parameters
from minitune.model import ModelConfig, build_model
from minitune.quant import QuantConfig, quantize
torch.manual_seed(0)
model = build_model(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
apply_lora(model, LoRAConfig(r=4, target_modules="all-linear"), "default")
opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
ids = torch.randint(0, 64, (2, 16))
losses = []
for _ in range(5):
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
assert losses[-1] < losses[0], losses
try:
    quantize(model, QuantConfig())
except MinituneError as e:
    assert "pip install bitsandbytes" in str(e), e
else:
    raise AssertionError("quantize without bitsandbytes must fail with an install hint")
print("ok", losses[0], losses[-1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")
