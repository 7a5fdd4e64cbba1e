//! An HTTP-trigger function: Kiln serves it at `/fn/{name}/{*path}`. `GET /fn/hi/Ada` answers
//! `Hello, Ada!`; any other method echoes the request body back. Build for `wasm32-wasip2`.

use kiln_sdk::http::{self, IncomingRequest, Method, ResponseOutparam};

struct Hello;

impl http::Handler for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        if let Method::Get = request.method() {
            // The last path segment is the name: /fn/hi/Ada → "Ada".
            let name = path
                .split('?')
                .next()
                .unwrap_or_default()
                .rsplit('/')
                .next()
                .unwrap_or_default();
            let name = if name.is_empty() { "world" } else { name };
            let body = format!("Hello, {name}!\n");
            return http::respond(out, 200, &[("content-type", "text/plain")], body.as_bytes());
        }
        match http::read_body(&request) {
            Ok(body) => http::respond(out, 200, &[("content-type", "application/octet-stream")], &body),
            Err(e) => http::respond(out, 400, &[("content-type", "text/plain")], e.to_string().as_bytes()),
        }
    }
}

http::export!(Hello);
