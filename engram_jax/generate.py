"""`python -m engram_jax.generate --workdir=DIR --prompt=TEXT`: continue a prompt from a checkpoint.

Decoding runs one token at a time with the KV cache (attention keys/values, MLA latents and the
Engram convolution state); the host hashes each new token from the last `max_ngram` tokens, exactly
as the training pipeline hashes whole sequences.
"""

from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import config as config_lib
from engram_jax import data as data_lib
from engram_jax import optim, storage
from engram_jax import train as train_lib
from engram_jax.hashing import tokenizer_fingerprint
from engram_jax.model import MOE_BIAS, Transformer


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def sample_logits(
    logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Draws one token per row: greedy, or softmax sampling after temperature, top-k and top-p.

    Args:
      logits_BV: `[B, V]` float logits.
      rng: PRNG key.
      temperature: 0 selects the argmax; otherwise logits are divided by it.
      top_k: keep only the k largest logits (0 keeps all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 keeps all).

    Returns:
      `[B]` int32 token ids.
    """
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sampling: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
            f"top_p={top_p} (in (0, 1]) expected"
        )
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if top_k:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]  # [B, 1]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Mass of the tokens strictly more likely than each one; keep while it is below top_p.
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        cutoff_B1 = jnp.min(
            jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True
        )
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


class Generator:
    """A trained model loaded from a workdir, ready to continue prompts."""

    def __init__(self, workdir: str, step: int | None = None):
        store = checkpoint_lib.CheckpointStore(
            storage.join(workdir, "checkpoints"), create=False, cleanup_partial=False
        )
        metadata = store.read_metadata(step)
        self.config = ml_collections.ConfigDict(metadata["config"])
        cfg = config_lib.validate(self.config)
        self.model_config = cfg.model
        path = storage.join(workdir, train_lib.TOKENIZER_FILE)
        self.tokenizer = data_lib.load_tokenizer(path)
        self._encode = data_lib.make_encoder(self.tokenizer)
        digest = tokenizer_fingerprint(self.tokenizer)
        if digest != metadata["tokenizer_fingerprint"]:
            raise checkpoint_lib.CheckpointMismatchError(
                f"{path}: tokenizer fingerprint {digest[:12]}... differs from the checkpoint's "
                f"{metadata['tokenizer_fingerprint'][:12]}...; the checkpoint was trained with "
                "another tokenizer"
            )
        self.spec, self.engram = train_lib.token_specs(cfg, self.tokenizer)
        if self.engram is not None and self.engram.hasher.fingerprint() != metadata["hasher"]:
            raise checkpoint_lib.CheckpointMismatchError(
                "Engram hasher fingerprint differs from the checkpoint's: the hash layout "
                "(seed, orders, heads, layers, primes, compressed vocabulary) changed"
            )

        model = Transformer(cfg.model)
        txs = train_lib.make_optimizers(cfg)[:2]
        abstract = jax.eval_shape(
            lambda rng: nn.meta.unbox(train_lib.init_train_state(model, cfg, txs, rng)),
            jax.random.PRNGKey(0),
        )
        abstract_dense, abstract_memory = train_lib.checkpoint_items(abstract)
        restored = store.restore(
            step,
            abstract_state=abstract_dense,
            abstract_memory=abstract_memory,
            items=("state", "memory"),
        )
        store.close()
        memory = restored["memory"]["tables"] if restored["memory"] else {}
        self.variables = {"params": optim.merge_params(restored["state"]["params"], memory)}
        if restored["state"]["moe_bias"]:
            self.variables[MOE_BIAS] = restored["state"]["moe_bias"]
        self.decoder = Transformer(cfg.model, decode=True)
        self._step = jax.jit(self._decode_step, donate_argnums=1)

    def _decode_step(self, variables, cache, tokens_BT, positions_BT, hash_ids):
        (logits_BTV, _), updated = self.decoder.apply(
            {**variables, "cache": cache},
            tokens_BT,
            positions_BT,
            None,
            hash_ids,
            mutable=["cache"],
        )
        return logits_BTV[:, -1], updated["cache"]

    def _hash_ids(self, history: np.ndarray, count: int) -> np.ndarray | None:
        """Hash ids `[1, L_e, count, M]` of the last `count` tokens of `history` ([1, n])."""
        if self.engram is None:
            return None
        window = self.model_config.engram.max_ngram - 1 + count
        recent = history[:, -window:]
        segments = np.ones_like(recent)
        ids = data_lib.compute_hash_ids(recent, segments, self.engram)  # [1, L_e, w, M]
        return ids[:, :, -count:]

    def generate(self, prompt: str, sampling: SamplingConfig) -> str:
        """Continues `prompt` by up to `sampling.max_tokens` tokens (stopping at eos)."""
        prompt_ids = self._encode(prompt).astype(np.int32)  # [P]
        return self.tokenizer.decode(self.generate_ids(prompt_ids, sampling))

    def generate_ids(self, prompt_ids: np.ndarray, sampling: SamplingConfig) -> list[int]:
        """The token ids that continue `prompt_ids` (`[P]` raw ids), eos excluded."""
        prompt_ids = np.asarray(prompt_ids, np.int32)[None, :]  # [1, P]
        if prompt_ids.shape[1] == 0:
            raise ValueError("prompt: got an empty prompt; expected at least one token")
        data_lib.check_token_ids(prompt_ids, self.spec.vocab_size, where="prompt")
        total = prompt_ids.shape[1] + sampling.max_tokens
        cache_shapes = jax.eval_shape(
            self.decoder.init,
            jax.random.PRNGKey(0),
            jnp.zeros((1, total), jnp.int32),
            None,
            None,
            _zero_hash_ids(self.model_config, total),
        )["cache"]
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
        rng = jax.random.PRNGKey(sampling.seed)

        history = prompt_ids
        positions = np.arange(prompt_ids.shape[1], dtype=np.int32)[None, :]
        logits, cache = self._step(
            self.variables,
            cache,
            prompt_ids,
            positions,
            self._hash_ids(history, prompt_ids.shape[1]),
        )
        new_tokens = []
        for index in range(sampling.max_tokens):
            rng, key = jax.random.split(rng)
            token = int(
                sample_logits(logits, key, sampling.temperature, sampling.top_k, sampling.top_p)[0]
            )
            if token == self.spec.eos_id:
                break
            new_tokens.append(token)
            history = np.concatenate([history, [[token]]], axis=1).astype(np.int32)
            if index + 1 == sampling.max_tokens:
                break
            position = np.asarray([[history.shape[1] - 1]], np.int32)
            logits, cache = self._step(
                self.variables, cache, history[:, -1:], position, self._hash_ids(history, 1)
            )
        return new_tokens


def _zero_hash_ids(model_config: config_lib.ModelConfig, length: int) -> jax.Array | None:
    e = model_config.engram
    if not e.enabled:
        return None
    return jnp.zeros((1, len(e.layer_ids), length, e.num_heads), jnp.int32)


def main(argv: list[str]) -> None:
    from absl import flags

    del argv
    logging.getLogger("absl").setLevel(logging.WARNING)
    f = flags.FLAGS
    generator = Generator(f.workdir, step=f.step)
    sampling = SamplingConfig(
        max_tokens=f.max_tokens or generator.config.generate_max_tokens,
        temperature=f.temperature,
        top_k=f.top_k,
        top_p=f.top_p,
        seed=f.seed,
    )
    print(f.prompt + generator.generate(f.prompt, sampling))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Training workdir (checkpoints/, tokenizer.json).")
    flags.DEFINE_string("prompt", None, "Text to continue.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("max_tokens", 0, "Tokens to sample (0: the config's generate_max_tokens).")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy decoding.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: off).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.mark_flags_as_required(["workdir", "prompt"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
