"""minidistill: distill large language models into small ones (MiniLLM, PD, KD, SeqKD, SFT)."""

__version__ = "0.1.0"
