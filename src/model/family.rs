//! Every decoder family afprobe runs, one entry each in [`FAMILIES`]: its
//! names, its block (norm positions and kind, activation, q/k norms, biases,
//! fused projections, Gemma's scales), which layers slide, transformers' class
//! defaults and what llama.cpp's GGUF files do differently. The `config.json`
//! parser (`config.rs`), the GGUF reader (`gguf.rs`) and the forward pass
//! (`decoder.rs`, both engines, training included) read this table; none of
//! them branches on the family.
//!
//! Adding a family: a variant of [`Architecture`], its entry in [`FAMILIES`],
//! and a fixture written by transformers (`tests/fixtures/make_families.py`)
//! checked in `tests/families.rs`.

use std::path::Path;

use serde::Serialize;

use crate::error::{Error, Result};

/// The decoder families the forward pass implements; what differs between
/// them is the data of their [`FamilySpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2/3.x, SmolLM: the reference block.
    Llama,
    /// Mistral: Llama with a sliding window on every layer.
    Mistral,
    /// Qwen2: biases on the q/k/v projections; optional sliding window.
    Qwen2,
    /// Qwen3: per-head RMSNorm on q and k.
    Qwen3,
    /// Phi-3: fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// OLMo 2: norms after attention and MLP (none before), q/k norms over the full projection.
    Olmo2,
    /// Gemma 2: four norms per block with `(1 + w)` scaling, GELU-tanh, embeddings
    /// scaled by √d_model, `query_pre_attn_scalar`, soft-caps, alternating sliding window.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-caps, with per-head q/k norms and a
    /// local rope base on its sliding-window layers.
    Gemma3,
}

/// How a norm scales the normalised row: `x̂ · w` or Gemma's `x̂ · (1 + w)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    Rms,
    RmsOnePlus,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SiLU (`silu`, `swish`).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// GELU, exact (`gelu`).
    GeluErf,
}

/// RMSNorm on queries and keys before rope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    /// Over each head (`[head_dim]` weights): Qwen3, Gemma 3.
    PerHead,
    /// Over the whole projection (`[n_heads * head_dim]` weights): OLMo 2.
    Full,
}

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

/// Which layers use the sliding window when the file does not list them
/// (`layer_types` in `config.json`, `attention.sliding_window_pattern` in GGUF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingRule {
    /// Every layer, when there is a window (Mistral, Phi-3).
    All,
    /// No layer (Llama, OLMo 2); a GGUF file of the family slides every layer
    /// when it has a window, as llama.cpp does.
    Never,
    /// Layers from `max_window_layers` on, when `use_sliding_window` (Qwen2,
    /// Qwen3); in GGUF, every layer when there is a window.
    FromMaxWindowLayers,
    /// Layer `l` slides when `l % every < every - 1`: Gemma 2 every other layer
    /// from the first, Gemma 3 five of every six. `pattern_key`: `config.json`'s
    /// `sliding_window_pattern` replaces `every` (Gemma 3).
    Periodic { every: usize, pattern_key: bool },
}

impl SlidingRule {
    /// The period of a periodic rule, which is also llama.cpp's default for a
    /// GGUF file of the family.
    pub fn period(self) -> Option<usize> {
        match self {
            SlidingRule::Periodic { every, .. } => Some(every),
            _ => None,
        }
    }
}

/// Layer `l` of `n_layers` slides when `l % every < every - 1`.
pub fn periodic_layers(n_layers: usize, every: usize) -> Vec<bool> {
    (0..n_layers).map(|l| l % every < every - 1).collect()
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
    /// The rope base (`default_theta`).
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Phi-3 keeps the pre-training length at the top level (default 4096).
    pub original_max_position_embeddings: Option<usize>,
}

/// How llama.cpp's GGUF files of the family differ from its HF checkpoints.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgufTraits {
    /// Why a GGUF file never names this architecture, if llama.cpp does not
    /// write it (such a file is refused).
    pub not_written: Option<&'static str>,
    /// q/k projection rows interleaved for rope by llama.cpp's converter (they
    /// are un-permuted at load).
    pub interleaved_qk: bool,
    /// The layer count at which llama.cpp scales queries by 1/√(d_model/n_heads)
    /// rather than 1/√head_dim: its rule for the 27B Gemmas (`llama-model.cpp`,
    /// `LLM_TYPE_27B`).
    pub width_scaled_layers: Option<usize>,
}

/// Everything afprobe knows about one family.
#[derive(Debug, Clone, Copy)]
pub struct FamilySpec {
    pub architecture: Architecture,
    /// HF `model_type` and GGUF `general.architecture` (and GGUF key prefix).
    pub name: &'static str,
    /// Other names a file may give it.
    pub aliases: &'static [&'static str],
    pub norms: BlockNorms,
    /// How the HF checkpoint's norms scale (llama.cpp's converter stores Gemma's
    /// `1 + w`, so a GGUF file's norms are always plain RMSNorm).
    pub norm: NormKind,
    /// The activation: `config.json`'s when it names one; always in GGUF.
    pub activation: Activation,
    pub qk_norm: QkNorm,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// q/k/v and gate/up stored fused (`qkv_proj`, `gate_up_proj`).
    pub fused_projections: bool,
    /// Embeddings multiplied by √d_model.
    pub scaled_embeddings: bool,
    /// `query_pre_attn_scalar` and the soft-caps are read from `config.json`
    /// (other families' config classes have no such keys: a stray one is ignored).
    pub score_keys: bool,
    pub sliding: SlidingRule,
    /// Rope base of the sliding-window layers when the file does not say
    /// (transformers' and llama.cpp's default alike).
    pub rope_local_theta: Option<f64>,
    pub hf: HfDefaults,
    pub gguf: GgufTraits,
}

const LLAMA_NORMS: BlockNorms = BlockNorms {
    attn_pre: Some("input_layernorm"),
    attn_post: None,
    mlp_pre: Some("post_attention_layernorm"),
    mlp_post: None,
};

const LLAMA_HF: HfDefaults = HfDefaults {
    tie_word_embeddings: false,
    rms_norm_eps: 1e-6,
    head_dim: None,
    sliding_window: None,
    max_window_layers: 28,
    query_pre_attn_scalar: None,
    attn_logit_softcapping: None,
    final_logit_softcapping: None,
    rope_theta: 10_000.0,
    max_position_embeddings: 2048,
    original_max_position_embeddings: None,
};

const PLAIN_GGUF: GgufTraits = GgufTraits {
    not_written: None,
    interleaved_qk: false,
    width_scaled_layers: None,
};

/// The Llama block; the other entries say how they differ from it.
const LLAMA: FamilySpec = FamilySpec {
    architecture: Architecture::Llama,
    name: "llama",
    aliases: &[],
    norms: LLAMA_NORMS,
    norm: NormKind::Rms,
    activation: Activation::Silu,
    qk_norm: QkNorm::None,
    qkv_bias: false,
    fused_projections: false,
    scaled_embeddings: false,
    score_keys: false,
    sliding: SlidingRule::Never,
    rope_local_theta: None,
    hf: LLAMA_HF,
    gguf: GgufTraits {
        interleaved_qk: true,
        ..PLAIN_GGUF
    },
};

const LLAMA_LIKE: FamilySpec = FamilySpec {
    gguf: PLAIN_GGUF,
    ..LLAMA
};

const GEMMA: FamilySpec = FamilySpec {
    norms: BlockNorms {
        attn_pre: Some("input_layernorm"),
        attn_post: Some("post_attention_layernorm"),
        mlp_pre: Some("pre_feedforward_layernorm"),
        mlp_post: Some("post_feedforward_layernorm"),
    },
    norm: NormKind::RmsOnePlus,
    activation: Activation::GeluTanh,
    scaled_embeddings: true,
    score_keys: true,
    hf: HfDefaults {
        tie_word_embeddings: true,
        head_dim: Some(256),
        sliding_window: Some(4096),
        query_pre_attn_scalar: Some(256.0),
        ..LLAMA_HF
    },
    ..LLAMA_LIKE
};

/// One entry per [`Architecture`], in its order.
pub const FAMILIES: [FamilySpec; 8] = [
    LLAMA,
    FamilySpec {
        architecture: Architecture::Mistral,
        name: "mistral",
        sliding: SlidingRule::All,
        hf: HfDefaults {
            sliding_window: Some(4096),
            max_position_embeddings: 131_072,
            ..LLAMA_HF
        },
        gguf: GgufTraits {
            not_written: Some("Mistral 7B GGUFs say `llama`"),
            ..PLAIN_GGUF
        },
        ..LLAMA_LIKE
    },
    FamilySpec {
        architecture: Architecture::Qwen2,
        name: "qwen2",
        qkv_bias: true,
        sliding: SlidingRule::FromMaxWindowLayers,
        hf: HfDefaults {
            max_position_embeddings: 32_768,
            ..LLAMA_HF
        },
        ..LLAMA_LIKE
    },
    FamilySpec {
        architecture: Architecture::Qwen3,
        name: "qwen3",
        qk_norm: QkNorm::PerHead,
        sliding: SlidingRule::FromMaxWindowLayers,
        hf: HfDefaults {
            head_dim: Some(128),
            max_position_embeddings: 32_768,
            ..LLAMA_HF
        },
        ..LLAMA_LIKE
    },
    FamilySpec {
        architecture: Architecture::Phi3,
        name: "phi3",
        fused_projections: true,
        sliding: SlidingRule::All,
        hf: HfDefaults {
            rms_norm_eps: 1e-5,
            max_position_embeddings: 4096,
            original_max_position_embeddings: Some(4096),
            ..LLAMA_HF
        },
        ..LLAMA_LIKE
    },
    FamilySpec {
        architecture: Architecture::Olmo2,
        name: "olmo2",
        norms: BlockNorms {
            attn_pre: None,
            attn_post: Some("post_attention_layernorm"),
            mlp_pre: None,
            mlp_post: Some("post_feedforward_layernorm"),
        },
        qk_norm: QkNorm::Full,
        hf: HfDefaults {
            rms_norm_eps: 1e-5,
            ..LLAMA_HF
        },
        ..LLAMA_LIKE
    },
    FamilySpec {
        architecture: Architecture::Gemma2,
        name: "gemma2",
        sliding: SlidingRule::Periodic {
            every: 2,
            pattern_key: false,
        },
        hf: HfDefaults {
            attn_logit_softcapping: Some(50.0),
            final_logit_softcapping: Some(30.0),
            max_position_embeddings: 8192,
            ..GEMMA.hf
        },
        gguf: GgufTraits {
            width_scaled_layers: Some(46),
            ..PLAIN_GGUF
        },
        ..GEMMA
    },
    FamilySpec {
        architecture: Architecture::Gemma3,
        name: "gemma3",
        aliases: &["gemma3_text"],
        qk_norm: QkNorm::PerHead,
        sliding: SlidingRule::Periodic {
            every: 6,
            pattern_key: true,
        },
        rope_local_theta: Some(10_000.0),
        hf: HfDefaults {
            rope_theta: 1_000_000.0,
            max_position_embeddings: 131_072,
            ..GEMMA.hf
        },
        gguf: GgufTraits {
            width_scaled_layers: Some(62),
            ..PLAIN_GGUF
        },
        ..GEMMA
    },
];

// `Architecture::spec` indexes the table by variant.
const _: () = {
    let mut i = 0;
    while i < FAMILIES.len() {
        assert!(FAMILIES[i].architecture as usize == i);
        i += 1;
    }
};

impl Architecture {
    /// The family's entry in [`FAMILIES`].
    pub fn spec(self) -> &'static FamilySpec {
        &FAMILIES[self as usize]
    }

    /// Parses a GGUF `general.architecture` or an HF `model_type`.
    pub fn parse(name: &str, source: &Path) -> Result<Architecture> {
        FAMILIES
            .iter()
            .find(|f| f.name == name || f.aliases.contains(&name))
            .map(|f| f.architecture)
            .ok_or_else(|| {
                Error::model_file(
                    source,
                    format!(
                        "unsupported architecture `{name}`; afprobe runs {}",
                        supported_architectures()
                    ),
                )
            })
    }

    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    pub fn has_qkv_bias(&self) -> bool {
        self.spec().qkv_bias
    }

    /// The family's block norms by HF name.
    pub fn block_norms(self) -> BlockNorms {
        self.spec().norms
    }

    /// Whether q/k/v and gate/up are stored fused (`qkv_proj`, `gate_up_proj`).
    pub fn fused_projections(self) -> bool {
        self.spec().fused_projections
    }
}

/// The names afprobe accepts, for error messages: `llama, …, gemma3 (gemma3_text)`.
pub fn supported_architectures() -> String {
    FAMILIES
        .iter()
        .map(|f| match f.aliases {
            [] => f.name.to_string(),
            aliases => format!("{} ({})", f.name, aliases.join(", ")),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_is_named_as_its_variant_serializes() {
        for f in &FAMILIES {
            assert_eq!(serde_json::to_value(f.architecture).unwrap(), f.name);
            let parsed = Architecture::parse(f.name, Path::new("config.json")).unwrap();
            assert_eq!(parsed, f.architecture);
        }
    }

    #[test]
    fn the_lists_in_messages() {
        assert_eq!(
            supported_architectures(),
            "llama, mistral, qwen2, qwen3, phi3, olmo2, gemma2, gemma3 (gemma3_text)"
        );
    }

    #[test]
    fn the_periodic_rules_are_transformers() {
        // Gemma 2: `l % 2 == 0`; Gemma 3: `(l + 1) % pattern != 0`.
        for n in 1..8 {
            let gemma2: Vec<bool> = (0..n).map(|l| l % 2 == 0).collect();
            assert_eq!(periodic_layers(n, 2), gemma2);
            for p in 1..8 {
                let gemma3: Vec<bool> = (0..n).map(|l| (l + 1) % p != 0).collect();
                assert_eq!(periodic_layers(n, p), gemma3);
            }
        }
    }
}
