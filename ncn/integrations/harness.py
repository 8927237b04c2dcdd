"""lm-evaluation-harness model type `ncn`: score an `ncn` checkpoint on the field's benchmarks.

lm-eval 0.4 finds models in its own registry only (no plugin entry point), so this module
registers `NCNLM` as `ncn` when imported, and its `main` is the thin command that does so and
then hands every argument to lm-eval's own command line:

    python -m ncn.integrations.harness --model ncn --model_args checkpoint=latest --tasks hellaswag

`checkpoint=` takes what run.py's `checkpoint=` takes (latest | best | folder | run name | MLflow
run id, searched under the current folder); `--device` (cuda when a GPU is visible, else the
CPU, with a warning if cuda was asked for) and `--batch_size` (ignored: one sequence at a time)
are accepted; any other `--model_args` key is refused (`NCNConfigError`), and the checkpoint
scored is named on stderr. An ncn error ends the command with one `error: <message>` line and
its exit status (2 for a bad checkpoint or key, docs/errors.md). Log-likelihoods come from one
full forward pass over the last `block_size` tokens of context + continuation; rolling log-likelihoods use lm-eval's
disjoint windows of `block_size` tokens; generation is greedy or sampled with the model's KV
cache (the uncached full forward for `ncn.pooling=global`, which cannot decode incrementally).
A global-pooling model's scores see the continuation through its pooled context (its leak,
docs/method.md §5).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ncn.data.tokenizer import get_encoding, stream_text
from ncn.errors import NCNConfigError, RunFailedError, exit_code
from ncn.training import checkpoint as checkpoints

log = logging.getLogger(__name__)

# the keys `--model_args` may set: checkpoint, and those lm-eval's command line passes itself
MODEL_ARGS = ("checkpoint", "device", "batch_size", "max_batch_size")


@register_model("ncn")
class NCNLM(TemplateLM):
    """An `ncn` checkpoint as an lm-eval language model (log-likelihood, rolling, generation).

    Raises:
        NCNConfigError: a keyword not in `MODEL_ARGS` (a misspelt `--model_args` key).
        CheckpointError: `checkpoint` names no usable checkpoint (see `checkpoint.resolve`).
    """

    def __init__(
        self,
        checkpoint: str = "latest",
        device: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:  # lm-eval passes every `--model_args` key here: a misspelt one would be ignored
            unknown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            raise NCNConfigError(
                f"--model_args {unknown} is not an argument of the ncn model: check the spelling, "
                f"accepted keys are {', '.join(MODEL_ARGS)}"
            )
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:  # lm-eval's command line asks for cuda unless told --device cpu
                log.warning("device=%s but no CUDA GPU is visible: scoring on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ckpt = checkpoints.load(checkpoints.resolve(str(checkpoint), Path.cwd()))
        print(f"scoring the {ckpt.describe()}", file=sys.stderr, flush=True)
        self.model = checkpoints.load_model(ckpt, device)
        self.encoding = get_encoding(ckpt.config.data.tokenizer)
        self.block = self.model.config.block_size
        self._device = torch.device(device)
        self.use_cache = ckpt.config.ncn.pooling != "global"

    @property
    def eot_token_id(self) -> int:
        return self.encoding.eot_token

    def tok_encode(self, string: str, **kwargs: Any) -> list[int]:
        return self.encoding.encode_ordinary(string)

    @torch.no_grad()
    def _logprobs(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(Σ log p(continuation | context), whether greedy decoding gives the continuation)."""
        tokens = (context + continuation)[-(self.block + 1) :]
        idx = torch.tensor([tokens[:-1]], device=self._device)
        logprobs = F.log_softmax(self.model(idx).logits[0, -len(continuation) :].float(), dim=-1)  # (n, V)
        target = torch.tensor(continuation, device=self._device)
        picked = logprobs.gather(1, target.unsqueeze(1)).sum().item()
        return picked, bool((logprobs.argmax(-1) == target).all())

    def _loglikelihood_tokens(
        self, requests: list, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = []
        for cache_key, context, continuation in tqdm(requests, disable=disable_tqdm):
            result = self._logprobs(context, continuation)
            results.append(result)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, result)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in tqdm(requests, disable=disable_tqdm):
            windows = utils.get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]),
                prefix_token=self.eot_token_id,
                max_seq_len=self.block,
                context_len=1,
            )
            parts = [self._logprobs(*utils.make_disjoint_window(w))[0] for w in windows]
            totals.append(sum(parts))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in tqdm(requests, disable=disable_tqdm):
            context, settings = request.args
            until = settings.get("until") or [self.encoding.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            prompt = (self.tok_encode(context) or [self.eot_token_id])[-self.block :]
            idx = torch.tensor([prompt], device=self._device)
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample", False) else 0.0
            new: list[int] = []
            text = ""
            for token in self.model.stream(
                idx, int(settings.get("max_gen_toks", 256)), temperature=temperature, use_cache=self.use_cache
            ):
                if token.item() == self.eot_token_id:
                    break
                new.append(token.item())
                text = "".join(stream_text(new, self.encoding))  # padded-vocabulary ids become U+FFFD
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the `ncn` model type registered (arguments passed through). An ncn
    error ends it with one `error: <message>` line on stderr and its exit status (2 for bad input)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except (NCNConfigError, RunFailedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code(exc)) from None


if __name__ == "__main__":
    main()
