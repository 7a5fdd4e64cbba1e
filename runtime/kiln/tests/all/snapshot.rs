//! Init hooks (Wizer-style snapshots) and the restore hook.

use std::collections::HashSet;

use serde_json::json;

use crate::support::{expect_error, wat, Kiln};

/// One invocation of a snapshot guest: (seed, fresh bytes, init runs, duration in µs).
fn run(kiln: &Kiln, name: &str) -> (String, String, u32, u64) {
    let response = kiln.invoke(name, "");
    assert_eq!(response.status(), 200);
    let micros: u64 = response.headers()["x-kiln-duration-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let text = response.text().unwrap();
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(parts.len(), 3, "{text:?}");
    (
        parts[0].to_owned(),
        parts[1].to_owned(),
        parts[2].parse().unwrap(),
        micros,
    )
}

#[test]
fn init_runs_once_at_deploy_and_every_invocation_starts_from_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir.path(), &[]);
    let deployed = kiln.must_deploy("warm", wat("snapshot"));
    assert!(kiln.log().contains("running the init hook"));
    let snapshot_digest = deployed["snapshot_digest"]
        .as_str()
        .expect("a snapshot digest")
        .to_owned();
    assert_ne!(snapshot_digest, deployed["digest"].as_str().unwrap());

    let runs: Vec<_> = (0..6).map(|_| run(&kiln, "warm")).collect();
    let seeds: HashSet<_> = runs.iter().map(|r| r.0.clone()).collect();
    let fresh: HashSet<_> = runs.iter().map(|r| r.1.clone()).collect();
    assert_eq!(seeds.len(), 1, "invocations share the init-time seed: {runs:?}");
    assert_eq!(
        fresh.len(),
        runs.len(),
        "bytes drawn after start-up are fresh per instance: {runs:?}"
    );
    assert!(
        runs.iter().all(|r| r.2 == 1),
        "init ran exactly once, at deploy: {runs:?}"
    );
    // The init's ~0.3 s of work is not repeated: every invocation is far below it.
    let slowest = runs.iter().map(|r| r.3).max().unwrap();
    assert!(slowest < 100_000, "an invocation took {slowest} µs");

    // Re-deploying the same upload neither re-runs the init nor makes a version.
    let compilations = kiln.metric("kiln_compilations_total");
    let again = kiln.deploy("warm", wat("snapshot"));
    assert_eq!(again.status(), 200);
    assert_eq!(
        again.json::<serde_json::Value>().unwrap()["snapshot_digest"],
        snapshot_digest.as_str()
    );
    assert_eq!(kiln.metric("kiln_compilations_total"), compilations);

    // The snapshot is what was stored: after a restart, the same seed.
    assert!(kiln.terminate().success());
    let kiln = Kiln::start_in(dir.path(), &[]);
    assert_eq!(run(&kiln, "warm").0, runs[0].0);
    assert_eq!(kiln.metric("kiln_compilations_total"), 0);
}

#[test]
fn the_restore_hook_reseeds_every_instance() {
    let kiln = Kiln::start();
    kiln.must_deploy("reseed", wat("snapshot_restore"));
    let runs: Vec<_> = (0..6).map(|_| run(&kiln, "reseed")).collect();
    let seeds: HashSet<_> = runs.iter().map(|r| r.0.clone()).collect();
    assert_eq!(seeds.len(), runs.len(), "each instance reseeded: {runs:?}");
    assert!(runs.iter().all(|r| r.2 == 1), "{runs:?}");
}

#[test]
fn an_init_hook_that_fails_or_overruns_fails_the_deploy() {
    let kiln = Kiln::start();
    let trap = br#"(module
        (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (data (i32.const 16) "init is broken\n")
        (func (export "_start"))
        (func (export "wizer.initialize")
          (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (i32.const 15))
          (drop (call $w (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
          unreachable))"#;
    let error = expect_error(kiln.deploy("broken", trap.to_vec()), 422, "invalid_code");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("init hook") && message.contains("unreachable"),
        "{message}"
    );
    assert!(
        message.contains("init is broken"),
        "the init's stderr is reported: {message}"
    );

    let forever = br#"(module (func (export "_start")) (func (export "wizer.initialize") (loop $l (br $l))))"#;
    let error = expect_error(
        kiln.deploy_with("forever", forever.to_vec(), json!({"timeout_ms": 300})),
        422,
        "invalid_code",
    );
    assert!(error["message"].as_str().unwrap().contains("ran past"), "{error}");

    let greedy = br#"(module (memory 1) (func (export "_start"))
        (func (export "wizer.initialize") (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))"#;
    let error = expect_error(
        kiln.deploy_with("greedy", greedy.to_vec(), json!({"memory_mb": 16})),
        422,
        "invalid_code",
    );
    assert!(error["message"].as_str().unwrap().contains("memory limit"), "{error}");

    for name in ["broken", "forever", "greedy"] {
        expect_error(kiln.get(&format!("/v1/functions/{name}")), 404, "not_found");
    }
    assert_eq!(std::fs::read_dir(kiln.data.join("artifacts")).unwrap().count(), 0);
}
