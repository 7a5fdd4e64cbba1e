//! A deploy's multipart body (`parse_multipart`). The input's first line is the Content-Type (a
//! boundary in it), the rest the body. Also: a well-formed body built around the input's bytes as
//! the `code` part gives those bytes back, exactly.
#![no_main]

use bytes::Bytes;
use futures_util::FutureExt;
use kiln_core::function::FunctionConfig;
use kiln_server::api::fuzzing::parse_multipart;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let (head, body) = (&data[..at], &data[at + 1..]);
    if let Ok(content_type) = std::str::from_utf8(head) {
        let parsed = parse(content_type, Bytes::copy_from_slice(body));
        if let Ok((code, config)) = parsed {
            config.check().expect("a parsed config passes its own checks");
            assert!(
                code.is_empty() || body.windows(code.len()).any(|w| w == &code[..]),
                "the code part is not a slice of the body"
            );
        }
    }

    // Round trip: the body's bytes as the code part of a well-formed form.
    const BOUNDARY: &str = "kiln-fuzz-boundary";
    let delimiter = format!("\r\n--{BOUNDARY}");
    if body.windows(delimiter.len()).any(|w| w == delimiter.as_bytes()) {
        return;
    }
    let config = br#"{"timeout_ms": 2000, "env": {"A": "b"}}"#;
    let mut form = Vec::new();
    form.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"config\"\r\n\r\n").as_bytes(),
    );
    form.extend_from_slice(config);
    form.extend_from_slice(format!("\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"code\"; filename=\"f.wasm\"\r\nContent-Type: application/wasm\r\n\r\n").as_bytes());
    form.extend_from_slice(body);
    form.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    let (code, parsed) = parse(&format!("multipart/form-data; boundary={BOUNDARY}"), form.into())
        .unwrap_or_else(|e| panic!("a well-formed form is refused: {}", e.message));
    assert_eq!(&code[..], body);
    assert_eq!(parsed, FunctionConfig::from_json(config).unwrap());
});

fn parse(content_type: &str, body: Bytes) -> Result<(Bytes, FunctionConfig), kiln_core::problem::Problem> {
    // The body is in memory: parsing never waits.
    parse_multipart(content_type, body)
        .now_or_never()
        .expect("parsing an in-memory body never pends")
}
