"""minitune: a torch-native LLM fine-tuning library you can read."""
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
