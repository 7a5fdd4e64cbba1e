//! Workload identity (`../shared/API.md`, "Identity") on the Wasm tier: a guest asks
//! `http://kiln.internal/identity?aud=...` through `wasi:http` for a token, and the tokens are
//! verified here as a service would — with `jsonwebtoken`, not Kiln's code, against the keys
//! fetched from `GET /.well-known/jwks.json` by the token's `kid`. `guests/http-fetch` fetches the
//! URL it is sent and answers `upstream <status>\n<body>`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use reqwest::blocking::RequestBuilder;
use serde_json::{json, Value};

use crate::support::{client, component, Kiln};

pub const AUDIENCE: &str = "https://api.example.com";

pub fn identity_url(audience: &str, extra: &str) -> String {
    let aud: String = audience
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("http://kiln.internal/identity?aud={aud}{extra}")
}

/// What the guest got for `url` from Kiln: the status and the body, after `upstream`.
fn through_guest(request: RequestBuilder, url: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let response = request.body(url.to_owned()).send().unwrap();
    let headers = response.headers().clone();
    let status = response.status().as_u16();
    let body = response.text().unwrap();
    assert_eq!(status, 200, "the guest could not fetch {url}: {body}");
    let (first, rest) = body.split_once('\n').unwrap_or((&body, ""));
    let upstream = first.strip_prefix("upstream ").unwrap_or_else(|| panic!("{body}"));
    (upstream.parse().unwrap(), rest.to_owned(), headers)
}

/// A token the guest fetched, and the invocation id Kiln reported for the request.
fn invocation_token(kiln: &Kiln, function: &str, url: &str) -> (Value, String) {
    let request = client()
        .post(kiln.url(&format!("/fn/{function}/")))
        .bearer_auth(&kiln.token);
    let (status, body, headers) = through_guest(request, url);
    assert_eq!(status, 200, "{body}");
    let id = headers["x-kiln-invocation-id"].to_str().unwrap().to_owned();
    (serde_json::from_str(&body).unwrap(), id)
}

fn sandbox_token(kiln: &Kiln, sandbox: &str) -> String {
    let request = client()
        .post(kiln.url(&format!("/sbx/{sandbox}/")))
        .bearer_auth(&kiln.token);
    let (status, body, _) = through_guest(request, &identity_url(AUDIENCE, ""));
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["token"].as_str().unwrap().to_owned()
}

/// The JWKS as a verifier gets it: no token.
fn jwks(kiln: &Kiln) -> JwkSet {
    let response = client().get(kiln.url("/.well-known/jwks.json")).send().unwrap();
    assert_eq!(response.status(), 200);
    let cache = response.headers()["cache-control"].to_str().unwrap().to_owned();
    assert!(cache.contains("max-age=60"), "{cache}");
    response.json().unwrap()
}

/// Verifies `token` as a service expecting `audience` from `issuer` would: the signature with the
/// JWKS key its `kid` names, then `alg`, `iss`, `aud`, `exp` (no leeway) and the required claims.
pub fn verify(kiln: &Kiln, issuer: &str, token: &str, audience: &str) -> Result<Value, ErrorKind> {
    let header = decode_header(token).map_err(|e| e.into_kind())?;
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let kid = header.kid.expect("a kid");
    let keys = jwks(kiln);
    let jwk = keys.find(&kid).unwrap_or_else(|| panic!("{kid} is not in the JWKS"));
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    validation.leeway = 0;
    decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| e.into_kind())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn kid(token: &str) -> String {
    decode_header(token).unwrap().kid.unwrap()
}

#[test]
fn a_wasm_invocation_gets_a_token_that_verifies_against_the_jwks() {
    let kiln = Kiln::start();
    // No allowed host at all: kiln.internal is reachable anyway, and nothing else is.
    let response = kiln.deploy_with("whoami", component("http-fetch"), json!({"allowed_hosts": []}));
    assert_eq!(response.status(), 201);
    let deployed: Value = response.json().unwrap();
    let issuer = kiln.url("");

    let (answer, invocation) = invocation_token(&kiln, "whoami", &identity_url(AUDIENCE, ""));
    let token = answer["token"].as_str().unwrap();
    let claims = verify(&kiln, &issuer, token, AUDIENCE).expect("the token verifies");
    let (iat, exp) = (claims["iat"].as_u64().unwrap(), claims["exp"].as_u64().unwrap());
    assert_eq!(
        claims,
        json!({
            "iss": issuer, "sub": format!("invocation:{invocation}"), "aud": AUDIENCE,
            "iat": iat, "exp": exp, "function": "whoami", "version": 1, "digest": deployed["digest"],
        }),
        "every claim, and nothing else"
    );
    assert!(deployed["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(iat.abs_diff(now()) <= 60, "iat {iat} is now");
    assert_eq!(exp - iat, 15 * 60, "15 minutes by default");
    let expires_at = answer["expires_at"].as_str().unwrap();
    assert!(expires_at.ends_with('Z') && expires_at.len() == 20, "{expires_at}");

    // A service expecting another audience or another issuer refuses it; so does any change.
    assert_eq!(
        verify(&kiln, &issuer, token, "https://other.example.com"),
        Err(ErrorKind::InvalidAudience)
    );
    assert_eq!(
        verify(&kiln, "https://not-kiln.example.com", token, AUDIENCE),
        Err(ErrorKind::InvalidIssuer)
    );
    let (head, rest) = token.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let forged_claims = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({"iss": issuer, "sub": "invocation:someone-else", "aud": AUDIENCE, "iat": iat, "exp": exp}).to_string(),
    );
    let forged = format!("{head}.{forged_claims}.{signature}");
    assert_eq!(
        verify(&kiln, &issuer, &forged, AUDIENCE),
        Err(ErrorKind::InvalidSignature)
    );

    // Each invocation is its own subject.
    let (again, second) = invocation_token(&kiln, "whoami", &identity_url(AUDIENCE, ""));
    assert_ne!(second, invocation);
    let claims = verify(&kiln, &issuer, again["token"].as_str().unwrap(), AUDIENCE).unwrap();
    assert_eq!(claims["sub"], format!("invocation:{second}"));

    // Expiry is enforced: a one-second token is refused once its second has passed.
    let (short, _) = invocation_token(&kiln, "whoami", &identity_url("svc", "&ttl=1"));
    let short = short["token"].as_str().unwrap().to_owned();
    let claims = verify(&kiln, &issuer, &short, "svc").unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 1);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(verify(&kiln, &issuer, &short, "svc"), Err(ErrorKind::ExpiredSignature));
    let (longest, _) = invocation_token(&kiln, "whoami", &identity_url("svc", "&ttl=3600"));
    let claims = verify(&kiln, &issuer, longest["token"].as_str().unwrap(), "svc").unwrap();
    assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);
}

#[test]
fn kiln_internal_refuses_bad_requests_and_the_policy_still_holds_elsewhere() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("whoami", component("http-fetch"), json!({"allowed_hosts": []}));
    assert_eq!(response.status(), 201);
    let fetch = |url: &str| {
        let request = client().post(kiln.url("/fn/whoami/")).bearer_auth(&kiln.token);
        let (status, body, _) = through_guest(request, url);
        (
            status,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::String(body)),
        )
    };
    let long = "a".repeat(257);
    for (url, status, code) in [
        ("http://kiln.internal/identity".to_owned(), 400, "invalid_request"),
        ("http://kiln.internal/identity?aud=".to_owned(), 400, "invalid_request"),
        (identity_url(&long, ""), 400, "invalid_request"),
        (identity_url("svc", "&ttl=3601"), 400, "invalid_request"),
        (identity_url("svc", "&ttl=0"), 400, "invalid_request"),
        (identity_url("svc", "&scope=x"), 400, "invalid_request"),
        ("http://kiln.internal/secrets".to_owned(), 404, "not_found"),
    ] {
        let (got, body) = fetch(&url);
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{url}: {body}"
        );
    }
    // Any port and case: the name is Kiln's, and nothing is resolved or connected.
    let (status, body) = fetch(&identity_url("svc", "").replace("kiln.internal", "KILN.internal:9"));
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].is_string());

    // Every other destination is still denied by the (empty) allowed_hosts.
    let response = client()
        .post(kiln.url("/fn/whoami/"))
        .bearer_auth(&kiln.token)
        .body("http://127.0.0.1:9/identity?aud=svc")
        .send()
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().unwrap();
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let response = client()
        .post(kiln.url("/fn/whoami/"))
        .bearer_auth(&kiln.token)
        .body("http://kiln.internal.example.com/identity?aud=svc")
        .send()
        .unwrap();
    assert_eq!(response.status(), 502, "a look-alike name is not Kiln's");

    // The public endpoints need no token and take only GET.
    let keys: Value = client()
        .get(kiln.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let key = &keys["keys"][0];
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );
    assert_eq!((key["alg"].as_str(), key["use"].as_str()), (Some("EdDSA"), Some("sig")));
    let discovery: Value = client()
        .get(kiln.url("/.well-known/openid-configuration"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(discovery["issuer"], kiln.url(""));
    assert_eq!(discovery["jwks_uri"], kiln.url("/.well-known/jwks.json"));
    let response = client().post(kiln.url("/.well-known/jwks.json")).send().unwrap();
    assert_eq!(response.status(), 405);
}

#[test]
fn a_wasm_sandbox_and_its_fork_get_tokens_naming_themselves() {
    let kiln = Kiln::start();
    let response = kiln.deploy_with("whoami", component("http-fetch"), json!({}));
    assert_eq!(response.status(), 201);
    let issuer = kiln.url("");
    let response = client()
        .post(kiln.url("/v1/sandboxes"))
        .bearer_auth(&kiln.token)
        .json(&json!({"function": "whoami"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let source = response.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();

    let claims = verify(&kiln, &issuer, &sandbox_token(&kiln, &source), AUDIENCE).unwrap();
    assert_eq!(claims["sub"], format!("sandbox:{source}"));
    assert_eq!(
        (claims["function"].as_str(), claims["version"].as_u64()),
        (Some("whoami"), Some(1))
    );

    let response = client()
        .post(kiln.url(&format!("/v1/sandboxes/{source}/fork")))
        .bearer_auth(&kiln.token)
        .json(&json!({"count": 1}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let fork = response.json::<Value>().unwrap()["sandboxes"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(fork, source);
    let claims = verify(&kiln, &issuer, &sandbox_token(&kiln, &fork), AUDIENCE).unwrap();
    assert_eq!(
        claims["sub"],
        format!("sandbox:{fork}"),
        "a fork is a sandbox of its own"
    );
    let claims = verify(&kiln, &issuer, &sandbox_token(&kiln, &source), AUDIENCE).unwrap();
    assert_eq!(claims["sub"], format!("sandbox:{source}"));
}

#[test]
fn rotation_keeps_the_old_key_published_so_tokens_signed_before_still_verify() {
    let data = tempfile::tempdir().unwrap();
    let issuer = "https://kiln.example.com";
    let mut kiln = Kiln::start_in(data.path(), &["--public-url", "https://kiln.example.com/"]);
    let response = kiln.deploy_with("whoami", component("http-fetch"), json!({}));
    assert_eq!(response.status(), 201);
    let token = |kiln: &Kiln| {
        let (answer, _) = invocation_token(kiln, "whoami", &identity_url(AUDIENCE, ""));
        answer["token"].as_str().unwrap().to_owned()
    };
    let before = token(&kiln);
    let old = kid(&before);
    assert_eq!(verify(&kiln, issuer, &before, AUDIENCE).unwrap()["iss"], issuer);

    let rotated: Value = client()
        .post(kiln.url("/v1/keys/rotate?keys=identity"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let new = rotated["identity"]["kid"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert_eq!(rotated["identity"]["published"], json!([new, old]), "{rotated}");
    assert!(rotated.get("kid").is_none(), "result-URL keys untouched: {rotated}");

    let after = token(&kiln);
    assert_eq!(kid(&after), new, "the new key signs");
    assert!(verify(&kiln, issuer, &after, AUDIENCE).is_ok());
    assert!(
        verify(&kiln, issuer, &before, AUDIENCE).is_ok(),
        "the old token still verifies"
    );

    // The keys, and the order of rotations, survive a restart.
    kiln.terminate();
    let kiln = Kiln::start_in(data.path(), &["--public-url", issuer]);
    let published: Vec<String> = jwks(&kiln)
        .keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect();
    assert_eq!(published, [new.clone(), old.clone()]);
    assert!(verify(&kiln, issuer, &before, AUDIENCE).is_ok());
    assert_eq!(kid(&token(&kiln)), new);

    // Without `keys`, both kinds rotate.
    let rotated: Value = client()
        .post(kiln.url("/v1/keys/rotate"))
        .bearer_auth(&kiln.token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(rotated["retired"], 1, "{rotated}");
    assert_eq!(
        rotated["identity"]["published"].as_array().unwrap().len(),
        3,
        "{rotated}"
    );
    assert!(verify(&kiln, issuer, &before, AUDIENCE).is_ok());
}
