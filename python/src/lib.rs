//! `afprobe._afprobe`: the native half of the Python package. It stays thin:
//! each function converts Python values, releases the GIL, calls the
//! `afprobe` library and converts the result back; the TransformerLens-style
//! API (names filters, hook lists, dicts of arrays) is in `afprobe/__init__.py`.
//!
//! Arrays cross as numpy without copies where the layout allows: results are
//! built in a `Vec` and handed to numpy (`IntoPyArray`), never copied again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use afprobe::model::hooks::HookFn;
use afprobe::model::{
    load_model_placed, CaptureRows, DeviceSpec, Edit, Engine, HookPoint, Hooks, KvCache, LogitsAt,
    Message, ModelSpec, NamesFilter, Placement, WeightDtype,
};
use candle_core::{DType, Tensor};
use numpy::ndarray::{ArrayD, IxDyn};
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArrayDyn};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyDict;

create_exception!(
    _afprobe,
    AfprobeError,
    PyException,
    "An error reported by afprobe: bad input, a model file it cannot read, a run that cannot go on. The message says what is wrong, where, and what to do."
);

/// afprobe's error as a Python `AfprobeError` carrying its message.
fn py_err(e: impl std::fmt::Display) -> PyErr {
    AfprobeError::new_err(format!("{e:#}"))
}

/// What [`NativeModel::run`] returns: logits (or none) and the cache by name.
type RunOutput<'py> = (Option<Bound<'py, PyArrayDyn<f32>>>, Bound<'py, PyDict>);

/// What [`open_store`] returns: manifest JSON, row JSON lines, tensor names, shard paths.
type StoreParts = (String, Vec<String>, Vec<String>, Vec<PathBuf>);

/// A Python exception raised inside a hook function, kept while the forward
/// pass unwinds with an afprobe error, and raised again in its place.
type RaisedInHook = Arc<Mutex<Option<PyErr>>>;

fn tensor_to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let dims = t.dims().to_vec();
    let data = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(py_err)?;
    let array = ArrayD::from_shape_vec(IxDyn(&dims), data).map_err(py_err)?;
    Ok(array.into_pyarray(py))
}

/// The CLI's allocator setting ([`afprobe::model::keep_freed_memory`], which
/// `AFPROBE_KEEP_FREED_MEMORY=0` turns off), once, when the first model loads
/// (not at import): without it a 1,024-token prefill from Python took 1.31x
/// the CLI's time (glibc's fresh `mmap` per activation).
fn keep_freed_memory_unless_opted_out() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(afprobe::model::keep_freed_memory);
}

/// One of a command-line option's values (`--dtype`, `--engine`), by name.
fn choice<T: clap::ValueEnum>(what: &str, name: &str) -> PyResult<T> {
    T::from_str(name, false).map_err(|_| {
        let valid: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| Some(v.to_possible_value()?.get_name().to_string()))
            .collect();
        py_err(format!(
            "{what} {name:?} is not one of {}",
            valid.join(", ")
        ))
    })
}

/// A loaded model (see `afprobe.Model` for the Python API over it).
#[pyclass(frozen, module = "afprobe._afprobe", name = "NativeModel")]
struct NativeModel {
    inner: afprobe::model::Model,
}

#[pymethods]
impl NativeModel {
    /// Loads `spec` (any `--model` spec; None = the default model) at `dtype`
    /// (auto, f32, f16, bf16, quantized) with an optional PEFT LoRA adapter
    /// directory, on `device` (cpu, cuda[:N], metal[:N]) run by `engine`
    /// (fused or portable; None: the device's default).
    #[new]
    #[pyo3(signature = (spec=None, adapter=None, dtype="auto", engine=None, device="cpu"))]
    fn new(
        py: Python<'_>,
        spec: Option<String>,
        adapter: Option<PathBuf>,
        dtype: &str,
        engine: Option<&str>,
        device: &str,
    ) -> PyResult<NativeModel> {
        let at = Placement {
            device: device.parse().map_err(py_err)?,
            engine: engine.map(|e| choice::<Engine>("engine", e)).transpose()?,
        };
        let dtype: WeightDtype = choice("dtype", dtype)?;
        keep_freed_memory_unless_opted_out();
        let spec = ModelSpec::parse(spec.as_deref());
        let inner = py
            .detach(|| load_model_placed(&spec, dtype, adapter.as_deref(), at))
            .map_err(py_err)?;
        Ok(NativeModel { inner })
    }

    /// The model's facts as a dict (TransformerLens' `cfg` names).
    fn cfg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("n_layers", c.n_layers)?;
        d.set_item("d_model", c.d_model)?;
        d.set_item("n_heads", c.n_heads)?;
        d.set_item("n_key_value_heads", c.n_kv_heads)?;
        d.set_item("d_head", c.head_dim)?;
        d.set_item("d_mlp", c.d_mlp)?;
        d.set_item("d_vocab", c.vocab_size)?;
        d.set_item("n_ctx", c.max_position_embeddings)?;
        d.set_item("family", c.architecture.name())?;
        d.set_item("dtype", self.inner.weights.name())?;
        d.set_item("engine", self.inner.transformer.engine().name())?;
        let device = DeviceSpec::from(&self.inner.transformer.device());
        d.set_item("device", device.to_string())?;
        d.set_item("path", self.inner.files.path())?;
        Ok(d)
    }

    /// The chat template applied to `messages` (`(role, content)` pairs), with
    /// the assistant header appended.
    fn format_chat(&self, messages: Vec<(String, String)>) -> PyResult<String> {
        let messages: Vec<Message> = messages
            .iter()
            .map(|(role, content)| Message::new(role, content))
            .collect();
        self.inner.format_chat(&messages).map_err(py_err)
    }

    /// Token ids of `text` (special tokens written in it become single ids).
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.inner.tokenizer.encode(text).map_err(py_err)
    }

    /// Token ids of `text` as the model writes it (no special tokens parsed).
    fn encode_plain(&self, text: &str) -> PyResult<Vec<u32>> {
        self.inner.tokenizer.encode_plain(text).map_err(py_err)
    }

    fn decode(&self, ids: Vec<u32>) -> PyResult<String> {
        self.inner.tokenizer.decode(&ids).map_err(py_err)
    }

    /// Every hook point's name, in forward order; with `internals`, the
    /// attention internals (`blocks.{l}.attn.hook_q` ...) of every layer too.
    fn hook_names(&self, internals: bool) -> Vec<String> {
        let n_layers = self.inner.config().n_layers;
        let mut names: Vec<String> = HookPoint::all(n_layers)
            .iter()
            .map(ToString::to_string)
            .collect();
        if internals {
            for l in 0..n_layers {
                for kind in ["q", "k", "v", "z", "pattern"] {
                    if let Ok(p) = HookPoint::attention(kind, l) {
                        names.push(p.to_string());
                    }
                }
            }
        }
        names
    }

    /// One forward pass of `tokens` from an empty cache.
    ///
    /// `names`: hook points to capture; `rows`: None for every position, or
    /// these positions (`[-1]` style is resolved in Python); `logits`: "all",
    /// "last", "none" or the rows of `rows`; `hooks`: `(name, fn)` pairs,
    /// `fn(activation: float32 [pos, d], name) -> float32 array` of the same shape.
    /// Returns `(logits [n, vocab] or None, {name: array})`, attention patterns
    /// as `[head, query_pos, key_pos]`.
    #[pyo3(signature = (tokens, names, rows=None, logits="all", hooks=Vec::new()))]
    fn run<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        names: Vec<String>,
        rows: Option<Vec<usize>>,
        logits: &str,
        hooks: Vec<(String, Py<PyAny>)>,
    ) -> PyResult<RunOutput<'py>> {
        let n = self.check_tokens(&tokens)?;
        if let Some(bad) = rows.iter().flatten().find(|&&r| r >= n) {
            return Err(py_err(format!(
                "position {bad} is out of range for a prompt of {n} tokens"
            )));
        }
        let points = self.points(&names)?;
        let capture_rows = match &rows {
            None => CaptureRows::All,
            Some(r) => CaptureRows::Rows(r.clone()),
        };
        let logits_at = match (logits, &rows) {
            ("all", _) => LogitsAt::All,
            ("last", _) => LogitsAt::Last,
            ("none", _) => LogitsAt::None,
            ("rows", Some(r)) => LogitsAt::Rows(r.clone()),
            (other, _) => {
                return Err(py_err(format!(
                    "logits {other:?} is not all, last, none or rows (with rows given)"
                )))
            }
        };
        let mut h = Hooks::capture(NamesFilter::Only(points), capture_rows);
        let raised = self.add_hook_fns(&mut h, hooks)?;
        let model = &self.inner;
        let result = py.detach(|| {
            h.check(model.config().n_layers)?;
            let out =
                model
                    .transformer
                    .forward(&tokens, &mut KvCache::new(), &mut h, &logits_at)?;
            Ok::<_, afprobe::Error>(out)
        });
        let out = reraise(result, &raised)?;
        let cache = PyDict::new(py);
        for name in &names {
            let point: HookPoint = name.parse().map_err(py_err)?;
            let t = h.cache.require(point).map_err(py_err)?;
            let t = match point {
                // TransformerLens' order: [head, query_pos, key_pos].
                HookPoint::AttnPattern(_) => t.permute((1, 0, 2)).map_err(py_err)?,
                _ => t.clone(),
            };
            cache.set_item(name, tensor_to_numpy(py, &t)?)?;
        }
        let logits = match logits_at {
            LogitsAt::None => None,
            _ => Some(tensor_to_numpy(py, &out)?),
        };
        Ok((logits, cache))
    }

    /// Generated token ids after `tokens` (stopping at the end-of-turn token),
    /// with `hooks` active on the prompt and every new token.
    #[pyo3(signature = (tokens, max_new_tokens, temperature, top_p, seed, hooks=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        tokens: Vec<u32>,
        max_new_tokens: usize,
        temperature: f64,
        top_p: f64,
        seed: u64,
        hooks: Vec<(String, Py<PyAny>)>,
    ) -> PyResult<Vec<u32>> {
        self.check_tokens(&tokens)?;
        let sampling = afprobe::generate::Sampling {
            temperature,
            top_p,
            seed,
            max_new_tokens,
        };
        let mut h = Hooks::none();
        let raised = self.add_hook_fns(&mut h, hooks)?;
        let model = &self.inner;
        let result = py.detach(|| {
            h.check(model.config().n_layers)?;
            afprobe::generate::generate(model, &tokens, &sampling, &mut h, |_| {})
        });
        reraise(result, &raised)
    }

    /// Σ log p of each continuation (token ids) after each prompt, teacher-forced
    /// on the prompt's KV cache as `capture --score` does: one prompt runs as
    /// capture runs a row alone; several run as one token tree over the prefix
    /// they share, as a batched capture does. `hooks` run on the prompts and
    /// the continuations. Returns `[prompt][continuation]`.
    #[pyo3(signature = (prompts, continuations, hooks=Vec::new()))]
    fn score(
        &self,
        py: Python<'_>,
        prompts: Vec<Vec<u32>>,
        continuations: Vec<Vec<u32>>,
        hooks: Vec<(String, Py<PyAny>)>,
    ) -> PyResult<Vec<Vec<f64>>> {
        for p in &prompts {
            self.check_tokens(p)?;
        }
        if let Some(i) = continuations.iter().position(Vec::is_empty) {
            return Err(py_err(format!(
                "continuation {i} has no tokens; give non-empty text"
            )));
        }
        let mut h = Hooks::none();
        let raised = self.add_hook_fns(&mut h, hooks)?;
        let model = &self.inner;
        let result = py.detach(|| {
            h.check(model.config().n_layers)?;
            afprobe::score::score_prompts(&model.transformer, &prompts, &continuations, &mut h)
        });
        reraise(result, &raised)
    }
}

impl NativeModel {
    /// Errors on an empty prompt or one past the context window; returns its length.
    fn check_tokens(&self, tokens: &[u32]) -> PyResult<usize> {
        let window = self.inner.config().max_position_embeddings;
        match tokens.len() {
            0 => Err(py_err("the prompt has no tokens")),
            n if n > window => Err(py_err(format!(
                "the prompt has {n} tokens; the model's context window is {window}"
            ))),
            n => Ok(n),
        }
    }

    fn points(&self, names: &[String]) -> PyResult<Vec<HookPoint>> {
        let n_layers = self.inner.config().n_layers;
        names
            .iter()
            .map(|n| {
                let p: HookPoint = n.parse().map_err(py_err)?;
                p.check_layer(n_layers).map_err(py_err)?;
                Ok(p)
            })
            .collect()
    }

    /// Registers each `(name, fn)` as an [`Edit::Call`] that calls `fn` with
    /// the GIL held; returns where an exception raised by `fn` is kept.
    fn add_hook_fns(
        &self,
        hooks: &mut Hooks,
        fns: Vec<(String, Py<PyAny>)>,
    ) -> PyResult<RaisedInHook> {
        let raised: RaisedInHook = Arc::new(Mutex::new(None));
        for (name, f) in fns {
            let point = self.points(std::slice::from_ref(&name))?[0];
            let slot = raised.clone();
            let call = move |point: HookPoint, x: &Tensor, _at: &[usize]| {
                Python::attach(|py| {
                    let arg = tensor_to_numpy(py, x)?;
                    let out = f.call1(py, (arg, point.to_string()))?;
                    let out: PyReadonlyArrayDyn<f32> = out.extract(py)?;
                    let out = out.as_array();
                    let data: Vec<f32> = out.iter().copied().collect();
                    Tensor::from_vec(data, out.shape(), x.device()).map_err(py_err)
                })
                .map(Some)
                .map_err(|e: PyErr| {
                    let message = format!("the hook function at `{point}` raised: {e}");
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    afprobe::Error::BadInput(message)
                })
            };
            hooks.add_edit(point, Edit::Call(HookFn(Arc::new(call))));
        }
        Ok(raised)
    }
}

/// The Python exception a hook raised, if any, else afprobe's error.
fn reraise<T>(result: afprobe::Result<T>, raised: &RaisedInHook) -> PyResult<T> {
    result.map_err(|e| {
        raised
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| py_err(e))
    })
}

/// Runs an afprobe command in this process: `args` are the words after
/// `afprobe` on a command line. Output files are those of the CLI.
#[pyfunction]
fn run_command(py: Python<'_>, args: Vec<String>) -> PyResult<()> {
    py.detach(|| afprobe::cli::Cli::run_args(args))
        .map_err(py_err)
}

/// Opens a finished activation store: `(manifest JSON, rows JSON lines,
/// per-row tensor names, shard file paths)`; an incomplete or damaged store
/// raises with afprobe's message.
#[pyfunction]
fn open_store(path: PathBuf) -> PyResult<StoreParts> {
    let store = afprobe::store::Store::open(&path).map_err(py_err)?;
    let manifest = serde_json::to_string(&store.manifest).map_err(py_err)?;
    let rows = store.rows().iter().map(|r| r.to_string()).collect();
    let names = store.manifest.tensor_names().map_err(py_err)?;
    let shards = store.shards().map(|s| s.path).collect();
    Ok((manifest, rows, names, shards))
}

/// The version of the afprobe library this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _afprobe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_function(wrap_pyfunction!(run_command, m)?)?;
    m.add_function(wrap_pyfunction!(open_store, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add("AfprobeError", m.py().get_type::<AfprobeError>())?;
    Ok(())
}
