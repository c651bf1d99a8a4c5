"""``reward-model``: a transformers sequence-classification reward model, by hub id or local path.

The paper scored helpfulness and harmlessness with ``Ray2333/gpt2-large-helpful-reward_model``
and ``Ray2333/gpt2-large-harmless-reward_model`` and with ArmoRM. Give each its own alias::

    personajudge eval --scorers helpful=reward-model,harmless=reward-model \\
        --scorer-option helpful.model=Ray2333/gpt2-large-helpful-reward_model \\
        --scorer-option harmless.model=Ray2333/gpt2-large-harmless-reward_model \\
        --dimension helpful=helpful:higher --dimension harmless=harmless:higher

Options: ``model`` (required), ``device`` (default: cuda when available, else
cpu), ``dtype`` (default float32 on CPU, bfloat16 on CUDA), ``batch_size``
(8), ``max_length`` (1024 tokens; prompts are truncated from the left so the
response is kept), ``template`` (``auto``: the tokenizer's chat template with
a user and an assistant turn, else ``"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"``,
the format of the HH-RLHF reward models; or any string with ``{prompt}`` and
``{response}``), ``head`` (``auto``: the output's ``score`` when the model
returns one, as ArmoRM does, else ``logits``; or ``logits`` / ``score`` /
``rewards``), ``index`` (which column of that head; ArmoRM's ``rewards`` holds
19 objectives), ``trust_remote_code`` (False; ArmoRM needs True).

torch and transformers are imported when the scorer is created, not when the
plugin is listed. Scores are computed in batches with padding and an attention
mask; a batch gives the same scores as one-by-one scoring up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from personajudge.plugins import hookimpl

from ..errors import ScorerError
from .base import PointwiseScorer, ScorerOptions

HH_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant: {response}"


class RewardModelOptions(ScorerOptions):
    model: str = Field(min_length=1, description="Hub id or local path of a sequence-classification model.")
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8)
    template: str = "auto"
    head: Literal["auto", "logits", "score", "rewards"] = "auto"
    index: int = Field(0, ge=0)
    trust_remote_code: bool = False


class RewardModelScorer(PointwiseScorer):
    name = "reward-model"
    description = "A transformers sequence-classification reward model (option model=ID_OR_PATH); higher = preferred."
    Options = RewardModelOptions
    options: RewardModelOptions
    requires = (("torch", "hf"), ("transformers", "hf"))

    @classmethod
    def validate(cls, options):
        if "model" not in options:
            raise ScorerError(f"scorer '{cls.name}' needs a model: --scorer-option ALIAS.model=HUB_ID_OR_PATH")
        opts = super().validate(options)
        if opts.template != "auto" and ("{prompt}" not in opts.template or "{response}" not in opts.template):
            raise ScorerError(f"scorer '{cls.name}': template must contain {{prompt}} and {{response}}")
        return opts

    def __init__(self, **options):
        super().__init__(**options)
        import torch
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        o = self.options
        self._torch = torch
        self.device = o.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = o.dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(o.model, trust_remote_code=o.trust_remote_code)
            major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
            dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
            self.model = AutoModelForSequenceClassification.from_pretrained(
                o.model, trust_remote_code=o.trust_remote_code, **{dtype_kw: getattr(torch, dtype_name)}
            )
        except (OSError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ScorerError(f"cannot load reward model '{o.model}': {first}") from None
        tok = self.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ScorerError(f"reward model '{o.model}': the tokenizer has neither a pad nor an eos token")
            tok.pad_token = tok.eos_token
        self.model.config.pad_token_id = tok.pad_token_id
        tok.padding_side = "right"
        tok.truncation_side = "left"  # keep the response when the prompt is long
        self.model.to(self.device).eval()

    @classmethod
    def config_for(cls, options):
        cfg = super().config_for(options)
        cfg["options"].pop("device", None)  # where it runs does not change what it measures
        cfg["options"].pop("batch_size", None)
        return cfg

    def format(self, prompt: str, response: str) -> str:
        tpl = self.options.template
        if tpl == "auto":
            if getattr(self.tokenizer, "chat_template", None):
                return self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
                )
            tpl = HH_TEMPLATE
        return tpl.replace("{prompt}", prompt).replace("{response}", response)

    def _head(self, out):
        head = self.options.head
        if head == "auto":
            head = "score" if getattr(out, "score", None) is not None else "logits"
        values = getattr(out, head, None)
        if values is None:
            raise ScorerError(
                f"reward model '{self.options.model}' returns no '{head}'; choose head=logits|score|rewards"
            )
        values = values.float().reshape(values.shape[0], -1)
        if self.options.index >= values.shape[1]:
            raise ScorerError(
                f"reward model '{self.options.model}': index {self.options.index} is out of range "
                f"for its '{head}' with {values.shape[1]} column(s)"
            )
        return values[:, self.options.index]

    def score(self, prompt: str, response: str) -> float:
        return self.score_many([(prompt, response)])[0]

    def score_many(self, items: Sequence[tuple[str, str]]) -> list[float]:
        torch = self._torch
        texts = [self.format(p, r) for p, r in items]
        out: list[float] = []
        bs = self.options.batch_size
        with torch.inference_mode():
            for i in range(0, len(texts), bs):
                enc = self.tokenizer(
                    texts[i : i + bs],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=self.options.max_length,
                    add_special_tokens=True,
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                res = self.model(**enc)
                out.extend(float(x) for x in self._head(res).cpu().tolist())
        return out

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()


@hookimpl
def register_scorers(register):
    register(RewardModelScorer)
