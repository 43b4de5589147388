"""Training data: packing, formats and masks, preference pairs, prompts, the synthetic task."""
from minitune.data.formats import Columns, Document, Template, make_formatter, tokenize_rows
from minitune.data.loading import load_rows, split_rows
from minitune.data.packing import IGNORE, ConstantLengthDataset, PackingStats

__all__ = ["Columns", "ConstantLengthDataset", "Document", "IGNORE", "PackingStats", "Template", "load_rows",
           "make_formatter", "split_rows", "tokenize_rows"]
