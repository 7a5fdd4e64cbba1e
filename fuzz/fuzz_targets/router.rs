//! The router and the path, id and query parsers, on a request line: `<METHOD> <target>` (the
//! target as a client sends it, parsed as hyper does). A route that hands a function name to a
//! handler hands a valid one; extra leading slashes change nothing; ids and query parameters that
//! pass are what their handlers expect; the guest's URI of a trigger is the path after the name.
#![no_main]

use std::time::Duration;

use http::{Method, Uri};
use kiln_core::function::is_valid_function_name;
use kiln_server::api::fuzzing::{guest_uri, route, url_lifetime, valid_id, version_param, Api, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(space) = line.iter().position(|&b| b == b' ') else {
        return;
    };
    let (Ok(method), Ok(uri)) = (Method::from_bytes(&line[..space]), Uri::try_from(&line[space + 1..])) else {
        return;
    };
    let path = uri.path();
    let query = uri.query();
    let routed = route(&method, path);
    assert_eq!(
        routed,
        route(&method, &format!("//{path}")),
        "leading slashes changed the route"
    );

    match routed {
        Route::Trigger(name) => {
            if let Ok(guest) = guest_uri(&uri, name) {
                assert!(guest.path().starts_with('/'));
                assert!(path.ends_with(guest.path()) || guest.path() == "/");
                assert_eq!(guest.query(), query);
            }
        }
        Route::Result(id) => {
            assert_eq!(method, Method::GET);
            check_id(id);
        }
        Route::Api(api) => match api {
            Api::Deploy(name)
            | Api::GetFunction(name)
            | Api::DeleteFunction(name)
            | Api::Invoke(name)
            | Api::InvokeAsync(name) => {
                assert!(is_valid_function_name(name), "a handler gets the name {name:?}");
                assert!(!name.contains(['/', '.', '%']));
            }
            Api::GetInvocation(id) | Api::InvocationLogs(id) => check_id(id),
            _ => {}
        },
        Route::Healthz | Route::Metrics | Route::Jwks | Route::Discovery | Route::Ingress(_) | Route::Refused(_) => {}
    }

    if let Ok(Some(version)) = version_param(query) {
        assert!(version > 0);
    }
    if let Ok(lifetime) = url_lifetime(query) {
        assert!(lifetime >= Duration::from_secs(1) && lifetime <= kiln_core::signing::MAX_LIFETIME);
    }
});

/// An id that passes is a canonical hyphenated UUID: nothing else reaches the database.
fn check_id(id: &str) {
    if valid_id(id) {
        assert_eq!(id.len(), 36);
        assert!(
            id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-')),
            "{id:?}"
        );
    }
}
