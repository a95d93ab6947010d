"""Write a tiny random Qwen3 (real Qwen3 vocabulary size and tokenizer) for CPU benchmarks:
python benchmarks/make_tiny_qwen3.py OUT_DIR [--tokenizer ../shared/tokenizers/qwen3]"""
import argparse

import torch
import transformers

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--tokenizer", default="../shared/tokenizers/qwen3")
args = parser.parse_args()
config = transformers.Qwen3Config(vocab_size=151936, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=4096, tie_word_embeddings=True)
torch.manual_seed(0)
transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(args.out)
transformers.AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(args.out)
print(args.out)
