//! Says hello over HTTP and reports what the guest saw of the request: method, path and query,
//! and header names (so a test can check which headers Kiln passes on). `/trap` traps; `/spin`
//! loops forever (Kiln's timeout must stop it); `/partial` starts its body, then traps.

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Hello;

impl Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        match path.as_str() {
            "/trap" => panic!("asked to trap"),
            "/spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            _ => {}
        }
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            other => format!("{other:?}"),
        };
        let mut names: Vec<String> = request.headers().entries().into_iter().map(|(name, _)| name).collect();
        names.sort();
        names.dedup();
        let body = format!("hello from wasi:http\nmethod: {method}\npath: {path}\nheaders: {}\n", names.join(","));
        if path == "/partial" {
            let response = OutgoingResponse::new(Fields::new());
            let outgoing = response.body().unwrap();
            ResponseOutparam::set(out, Ok(response));
            let stream = outgoing.write().unwrap();
            stream.blocking_write_and_flush(b"the first part, and then").unwrap();
            panic!("trapped mid-body");
        }

        let headers = Fields::from_list(&[("content-type".to_owned(), b"text/plain".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        let outgoing = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = outgoing.write().unwrap();
        stream.blocking_write_and_flush(body.as_bytes()).unwrap();
        drop(stream);
        OutgoingBody::finish(outgoing, None).unwrap();
    }
}

wasip2::http::proxy::export!(Hello);

fn main() {}
