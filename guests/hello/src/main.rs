//! README's first function: `{"name": "Ada"}` in, `{"greeting": "Hello, Ada!"}` out. An empty
//! name is an error, which Kiln reports as `502 function_failed` with the message.

use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Input {
    name: String,
}

#[derive(Serialize)]
struct Output {
    greeting: String,
}

#[kiln_sdk::function]
fn handle(input: Input) -> Result<Output, String> {
    if input.name.trim().is_empty() {
        return Err("hello: the name is empty".into());
    }
    Ok(Output {
        greeting: format!("Hello, {}!", input.name),
    })
}
