"""The tiny training run shared by the trainer tests and their child processes."""

from switchx.config import DataConfig, ModelConfig, MoeConfig, TrainConfig


def configs(steps: int = 30, moe_changes: dict | None = None, **train_changes):
  model = ModelConfig(vocab_size=356, d_model=32, num_heads=4, head_dim=8, d_ff=64, num_encoder_layers=2,
                      num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      encoder_sparse="every:2", decoder_sparse="every:2",
                      moe=MoeConfig(num_experts=4, group_size=64, min_capacity=1, **(moe_changes or {})))
  train = dict(optimizer="adafactor", learning_rate=0.01, schedule="constant", warmup_steps=0,
               num_train_steps=steps, batch_size=4, inputs_length=32, targets_length=8, log_every=5,
               eval_every=0, eval_batches=1, checkpoint_every=5, keep_checkpoints=10)
  train.update(train_changes)
  data = DataConfig(source="builtin", tokenizer_vocab_size=256)
  return model, TrainConfig(**train), data
