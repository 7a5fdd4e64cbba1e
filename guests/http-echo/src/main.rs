//! Streams the request body back as the response body, one chunk at a time: a 10 MiB upload
//! never sits whole in the guest (nor, if the host streams too, in the server).

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};
use wasip2::io::streams::StreamError;

struct Echo;

impl Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let incoming = request.consume().unwrap();
        let input = incoming.stream().unwrap();
        let headers = Fields::from_list(&[("content-type".to_owned(), b"application/octet-stream".to_vec())]).unwrap();
        let response = OutgoingResponse::new(headers);
        let outgoing = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let output = outgoing.write().unwrap();
        loop {
            match input.blocking_read(64 * 1024) {
                // blocking-write-and-flush takes at most 4096 bytes per call.
                Ok(chunk) => chunk.chunks(4096).for_each(|piece| output.blocking_write_and_flush(piece).unwrap()),
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => panic!("reading the request body: {}", e.to_debug_string()),
            }
        }
        drop(input);
        IncomingBody::finish(incoming);
        drop(output);
        OutgoingBody::finish(outgoing, None).unwrap();
    }
}

wasip2::http::proxy::export!(Echo);

fn main() {}
