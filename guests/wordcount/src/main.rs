//! Counts words: `{"text": "...", "top": 3}` in, the number of words, of distinct words, and the
//! most frequent ones out. Shows the SDK's config access (`MIN_LENGTH`: shorter words are not
//! counted) and structured logs (one JSON line on stderr per invocation). Empty text is an error.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    text: String,
    /// How many of the most frequent words to return.
    #[serde(default = "default_top")]
    top: usize,
}

fn default_top() -> usize {
    3
}

#[derive(Serialize)]
struct Output {
    words: usize,
    distinct: usize,
    /// The most frequent words with their counts, most frequent first (ties alphabetically).
    top: Vec<(String, usize)>,
}

#[kiln_sdk::function]
fn handle(input: Input) -> Result<Output, Box<dyn std::error::Error>> {
    let min_length: usize = kiln_sdk::config::parse("MIN_LENGTH")?.unwrap_or(1);
    let mut counts: HashMap<String, usize> = HashMap::new();
    let words = input
        .text
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| w.chars().count() >= min_length.max(1));
    for word in words {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    if counts.is_empty() {
        return Err("wordcount: the text has no words".into());
    }
    let mut top: Vec<(String, usize)> = counts.iter().map(|(w, n)| (w.clone(), *n)).collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top.truncate(input.top);
    let output = Output {
        words: counts.values().sum(),
        distinct: counts.len(),
        top,
    };
    kiln_sdk::info!("counted", words = output.words, distinct = output.distinct);
    Ok(output)
}
