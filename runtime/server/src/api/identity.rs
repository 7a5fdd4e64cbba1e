//! The public half of workload identity (`kiln_core::identity`): the keys that verify guests'
//! tokens, `GET /.well-known/jwks.json`, and the OpenID Connect discovery document that points to
//! them, `GET /.well-known/openid-configuration`. Neither needs a token: a service verifying a
//! token has none of Kiln's.

use http::{header, Response, StatusCode};
use kiln_core::identity::Issuer;

use super::body::{self, Body};
use super::openapi::{Discovery, Jwks};

/// Verifiers may cache the keys this long. A rotation publishes the new key as it starts
/// signing, so a verifier that meets an unknown `kid` should fetch again (most libraries do).
const CACHE_CONTROL: &str = "public, max-age=60";

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "identity", security(()),
    responses((status = 200, description = "The public keys (JWK set, RFC 7517) that verify the identity tokens guests get from `http://kiln.internal/identity`: the signing key and those a rotation replaced while tokens they signed may still be valid", body = Jwks, content_type = "application/json")))]
pub fn jwks(issuer: &Issuer) -> Response<Body> {
    cached(body::json(StatusCode::OK, &issuer.jwks()))
}

#[utoipa::path(get, path = "/.well-known/openid-configuration", tag = "identity", security(()),
    responses((status = 200, description = "OpenID Connect discovery: the issuer (`iss` of the tokens) and where its keys are", body = Discovery, content_type = "application/json")))]
pub fn discovery(issuer: &Issuer) -> Response<Body> {
    cached(body::json(StatusCode::OK, &issuer.discovery()))
}

fn cached(mut response: Response<Body>) -> Response<Body> {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static(CACHE_CONTROL));
    response
}
