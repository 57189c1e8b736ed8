//! The weights a config implies: every tensor the forward pass reads, by HF
//! name and shape, in the order `Transformer::new` reads them.

use super::config::{ModelConfig, QkNorm};

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
