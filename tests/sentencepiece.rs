//! SentencePiece GGUF vocabularies (`tokenizer.ggml.model = llama`, as in Llama 2
//! and Mistral 7B files): the tokenizer afprobe rebuilds from the metadata gives
//! transformers' ids and decodings. Fixtures: llama.cpp's vocab-only Llama 2
//! GGUF and the real Mistral 7B v0.3 vocabulary written the same way
//! (tests/fixtures/make_sentencepiece.py).

mod common;

use afprobe::model::gguf::GgufFile;
use afprobe::model::tokenizer::Tokenizer;
use common::fixtures;
use serde_json::Value;

#[test]
fn llama2_and_mistral_sentencepiece_ggufs_tokenize_like_transformers() {
    let dir = fixtures().join("sentencepiece");
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ids.json")).unwrap()).unwrap();
    let texts = want["texts"].as_array().unwrap();
    for file in want["files"].as_array().unwrap() {
        let path = dir.join(file["gguf"].as_str().unwrap());
        let gguf = GgufFile::open(&path).unwrap();
        let meta = gguf.tokenizer_meta();
        assert_eq!(meta.model, "llama");
        let tokenizer = Tokenizer::from_gguf(&meta, gguf.architecture.name(), &path).unwrap();
        assert_eq!(tokenizer.bos_token.as_deref(), Some("<s>"));
        assert!(tokenizer.add_bos);
        for (i, text) in texts.iter().enumerate() {
            let text = text.as_str().unwrap();
            let reference = common::token_ids(&file["transformers"][i]);
            // afprobe's documented BOS rule: a text that already starts with the
            // BOS gets no second one (transformers adds it again).
            let expected = match reference.as_slice() {
                [1, 1, rest @ ..] => [&[1], rest].concat(),
                _ => reference.clone(),
            };
            let got = tokenizer.encode(text).unwrap();
            assert_eq!(got, expected, "{}: {text:?}", path.display());
            assert_eq!(
                tokenizer.decode(&reference).unwrap(),
                file["decoded"][i].as_str().unwrap(),
                "{}: decoding {text:?}",
                path.display()
            );
        }
    }
    // Mistral's rows cover the cases where transformers and SentencePiece part:
    // leading blanks (one `▁` fewer) and control tokens written in the text.
    let mistral = &want["files"][0];
    let differs = (0..texts.len())
        .filter(|&i| {
            common::token_ids(&mistral["transformers"][i])
                != common::token_ids(&mistral["sentencepiece"][i])
        })
        .count();
    assert!(differs >= 3, "{differs}");
}

#[test]
fn a_sentencepiece_vocabulary_without_scores_or_merges_is_refused_by_key() {
    let path = fixtures().join("sentencepiece").join("llama2.vocab.gguf");
    let gguf = GgufFile::open(&path).unwrap();
    let mut meta = gguf.tokenizer_meta();
    meta.scores.truncate(10);
    let err = Tokenizer::from_gguf(&meta, "llama", &path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.scores has 10 entries for 32000 tokens")
            && err.contains("llama2.vocab.gguf"),
        "{err}"
    );
}
