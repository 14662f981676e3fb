"""DeepOneConfig: the Hugging Face configuration of the deepone family (DeepNet post-norm, see models/config.py).

NOTE: this file is copied verbatim into every deepone export (`final/`, `python export.py`) beside
modeling_deepone.py, and `config.json` points at both through `auto_map`, so an exported folder loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` on a machine without this repository. It must
therefore import nothing but `transformers` (and the standard library), and keep working with transformers 4.x and
5.x: hence the plain `__init__` with keyword defaults rather than 5.x's annotated fields.
"""

from transformers import PretrainedConfig


class DeepOneConfig(PretrainedConfig):
    """The fields of a deepone ModelConfig in Hugging Face form.

    The residual scale alpha = (2N)^(1/4) of the post-norm blocks follows from `num_hidden_layers`; nothing else about
    DeepNet needs storing (its init only matters before training).
    """

    model_type = "deepone"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 768,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 16,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 4096,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        hidden_act: str = "silu",
        qk_norm: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.qk_norm = qk_norm
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
