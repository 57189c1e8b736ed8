//! What differs between decoder families, as data: which norms a block has and
//! what they are called, fused or separate projections, q/k norms. The forward
//! pass (`transformer.rs`) reads these; it has no per-family branches.
//!
//! Adding a family: a variant of [`Architecture`] with its config parsing
//! (`config.rs`), its row here, and a fixture written by transformers
//! (`tests/fixtures/make_families.py`) checked in `tests/families.rs`.

use super::config::{Architecture, ModelConfig, QkNorm};

/// HF names of the four norm positions of a block (`None`: the family has no
/// norm there). Llama's `post_attention_layernorm` is the norm *before* the MLP;
/// Gemma's and OLMo 2's is applied to the attention output.
#[derive(Debug, Clone, Copy)]
pub struct BlockNorms {
    pub attn_pre: Option<&'static str>,
    pub attn_post: Option<&'static str>,
    pub mlp_pre: Option<&'static str>,
    pub mlp_post: Option<&'static str>,
}

impl Architecture {
    /// The family's block norms by HF name.
    pub fn block_norms(self) -> BlockNorms {
        match self {
            Architecture::Gemma2 | Architecture::Gemma3 => BlockNorms {
                attn_pre: Some("input_layernorm"),
                attn_post: Some("post_attention_layernorm"),
                mlp_pre: Some("pre_feedforward_layernorm"),
                mlp_post: Some("post_feedforward_layernorm"),
            },
            Architecture::Olmo2 => BlockNorms {
                attn_pre: None,
                attn_post: Some("post_attention_layernorm"),
                mlp_pre: None,
                mlp_post: Some("post_feedforward_layernorm"),
            },
            _ => BlockNorms {
                attn_pre: Some("input_layernorm"),
                attn_post: None,
                mlp_pre: Some("post_attention_layernorm"),
                mlp_post: None,
            },
        }
    }

    /// Whether llama.cpp scales a GGUF model's queries by 1/√(d_model/n_heads)
    /// rather than 1/√head_dim: its rule for the 27B Gemmas, known by their
    /// layer count (`llama-model.cpp`: Gemma 2 with 46 layers, Gemma 3 with 62).
    pub fn gguf_scales_by_width(self, n_layers: usize) -> bool {
        matches!(
            (self, n_layers),
            (Architecture::Gemma2, 46) | (Architecture::Gemma3, 62)
        )
    }

    /// Whether q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`).
    pub fn fused_projections(self) -> bool {
        matches!(self, Architecture::Phi3)
    }
}

/// What a `config.json` that leaves a key out means: the defaults of
/// transformers' config class for every key that changes the computation
/// (`models/<family>/configuration_<family>.py`, transformers 5.23). A key
/// present as `null` means "none", not the default, as in transformers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HfDefaults {
    pub tie_word_embeddings: bool,
    pub rms_norm_eps: f64,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: layers from this index on slide, when `use_sliding_window`.
    pub max_window_layers: usize,
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// The rope base (`default_theta`), and Gemma 3's on its sliding layers.
    pub rope_theta: f64,
    pub rope_local_theta: Option<f64>,
    pub max_position_embeddings: usize,
    /// Phi-3 keeps the pre-training length at the top level (default 4096).
    pub original_max_position_embeddings: Option<usize>,
    pub activation: &'static str,
}

impl Architecture {
    /// transformers' class defaults for this family (see [`HfDefaults`]).
    pub fn hf_defaults(self) -> HfDefaults {
        let llama = HfDefaults {
            tie_word_embeddings: false,
            rms_norm_eps: 1e-6,
            head_dim: None,
            sliding_window: None,
            max_window_layers: 28,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_theta: 10_000.0,
            rope_local_theta: None,
            max_position_embeddings: 2048,
            original_max_position_embeddings: None,
            activation: "silu",
        };
        let gemma = HfDefaults {
            tie_word_embeddings: true,
            head_dim: Some(256),
            sliding_window: Some(4096),
            query_pre_attn_scalar: Some(256.0),
            activation: "gelu_pytorch_tanh",
            ..llama
        };
        match self {
            Architecture::Llama => llama,
            Architecture::Mistral => HfDefaults {
                sliding_window: Some(4096),
                max_position_embeddings: 131_072,
                ..llama
            },
            Architecture::Qwen2 => HfDefaults {
                max_position_embeddings: 32_768,
                ..llama
            },
            Architecture::Qwen3 => HfDefaults {
                head_dim: Some(128),
                max_position_embeddings: 32_768,
                ..llama
            },
            Architecture::Phi3 => HfDefaults {
                rms_norm_eps: 1e-5,
                max_position_embeddings: 4096,
                original_max_position_embeddings: Some(4096),
                ..llama
            },
            Architecture::Olmo2 => HfDefaults {
                rms_norm_eps: 1e-5,
                ..llama
            },
            Architecture::Gemma2 => HfDefaults {
                attn_logit_softcapping: Some(50.0),
                final_logit_softcapping: Some(30.0),
                max_position_embeddings: 8192,
                ..gemma
            },
            Architecture::Gemma3 => HfDefaults {
                rope_theta: 1_000_000.0,
                rope_local_theta: Some(10_000.0),
                max_position_embeddings: 131_072,
                ..gemma
            },
        }
    }
}

/// One weight the forward pass reads: HF name and shape (outermost first).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedWeight {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Every weight `Transformer::new` reads, with the shape `c` implies, in the
/// order it reads them.
pub fn expected_weights(c: &ModelConfig) -> Vec<ExpectedWeight> {
    let d = c.d_model;
    let mut out = vec![ExpectedWeight {
        name: "model.embed_tokens.weight".into(),
        shape: vec![c.vocab_size, d],
    }];
    for l in 0..c.n_layers {
        out.extend(layer_weights(c, l));
    }
    out.push(ExpectedWeight {
        name: "model.norm.weight".into(),
        shape: vec![d],
    });
    if !c.tied_embeddings {
        out.push(ExpectedWeight {
            name: "lm_head.weight".into(),
            shape: vec![c.vocab_size, d],
        });
    }
    out
}

/// The weights of block `l`.
pub fn layer_weights(c: &ModelConfig, l: usize) -> Vec<ExpectedWeight> {
    let (d, q, kv) = (c.d_model, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let mut out = Vec::with_capacity(14);
    let mut push = |name: String, shape: Vec<usize>| out.push(ExpectedWeight { name, shape });
    let p = format!("model.layers.{l}");
    let norms = c.architecture.block_norms();
    for norm in [
        norms.attn_pre,
        norms.attn_post,
        norms.mlp_pre,
        norms.mlp_post,
    ]
    .into_iter()
    .flatten()
    {
        push(format!("{p}.{norm}.weight"), vec![d]);
    }
    if c.architecture.fused_projections() {
        push(
            format!("{p}.self_attn.qkv_proj.weight"),
            vec![q + 2 * kv, d],
        );
        push(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * c.d_mlp, d]);
    } else {
        push(format!("{p}.self_attn.q_proj.weight"), vec![q, d]);
        push(format!("{p}.self_attn.k_proj.weight"), vec![kv, d]);
        push(format!("{p}.self_attn.v_proj.weight"), vec![kv, d]);
        push(format!("{p}.mlp.gate_proj.weight"), vec![c.d_mlp, d]);
        push(format!("{p}.mlp.up_proj.weight"), vec![c.d_mlp, d]);
    }
    if c.architecture.has_qkv_bias() {
        push(format!("{p}.self_attn.q_proj.bias"), vec![q]);
        push(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
        push(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
    }
    match c.family.qk_norm {
        QkNorm::None => {}
        QkNorm::PerHead => {
            push(format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]);
            push(format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]);
        }
        QkNorm::Full => {
            push(format!("{p}.self_attn.q_norm.weight"), vec![q]);
            push(format!("{p}.self_attn.k_norm.weight"), vec![kv]);
        }
    }
    push(format!("{p}.self_attn.o_proj.weight"), vec![d, q]);
    push(format!("{p}.mlp.down_proj.weight"), vec![d, c.d_mlp]);
    out
}
