"""minitune: a torch-native LLM fine-tuning library you can read."""
import logging

# On CPUs with AVX512-BF16, importing bitsandbytes warns that it cannot fetch an optional bf16
# inference kernel ("Failed to load CPU gemm_4bit_forward from kernels-community ... pip install
# kernels"). That kernel only serves bitsandbytes' repacked CPU inference format, which minitune
# never creates (its 4-bit layers always take the exact `matmul_4bit` path), so the notice is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from minitune.checkpoint import load_model, save_model
from minitune.errors import MinituneError
from minitune.generate import GenerationOutput, generate
from minitune.model import ModelConfig, Transformer, build_model
from minitune.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"
__all__ = [
    "GenerationOutput", "MinituneError", "ModelConfig", "Tokenizer", "Transformer", "build_model",
    "generate", "load_model", "load_tokenizer", "save_model",
]
