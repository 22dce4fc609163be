from trustgen.models.gan import GAN, GANConfig
from trustgen.models.gpt import GPT, GPTConfig
from trustgen.models.registry import FAMILIES, build_model, family_of, model_config
from trustgen.models.rnn import CharRNN, RNNConfig
from trustgen.models.vae import VAE, VAEConfig

__all__ = ["FAMILIES", "GAN", "GPT", "VAE", "CharRNN", "GANConfig", "GPTConfig", "RNNConfig", "VAEConfig",
           "build_model", "family_of", "model_config"]
