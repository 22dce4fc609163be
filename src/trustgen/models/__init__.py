from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.registry import FAMILIES, build_model, model_config
from trustgen.models.rnn import CharRNN, RNNConfig

__all__ = ["FAMILIES", "GPT", "CharRNN", "GPTConfig", "RNNConfig", "build_model", "model_config"]
