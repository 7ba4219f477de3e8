//! House rules the compiler cannot check, checked over the source text (as
//! rust-analyzer's tidy test does): every file says what it owns, SQLite
//! stays inside `store/`, gRPC types stay in the service and server layers,
//! and each module uses only the layers beneath it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its text, by path relative to the
/// crate root ("src/store/mod.rs").
fn sources() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ reads") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    assert!(files.len() > 20, "found only {files:?}");
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a source file reads");
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, text)
        })
        .collect()
}

/// The code of a file without its comments, so that prose may name
/// anything.
fn code(text: &str) -> String {
    text.lines()
        .map(|l| match l.trim_start() {
            t if t.starts_with("//") => "",
            _ => l.split(" // ").next().unwrap_or(l),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module a file belongs to for layering: its own path when [`LAYERS`]
/// names it ("src/probe/checker.rs" -> "probe/checker"), else its top-level
/// module ("src/store/query.rs" -> "store").
fn module(path: &str) -> &str {
    let rest = path.trim_start_matches("src/").trim_end_matches(".rs");
    if LAYERS.iter().any(|l| l.contains(&rest)) {
        return rest;
    }
    rest.split('/').next().unwrap()
}

fn fail(rule: &str, offenders: Vec<String>) {
    assert!(
        offenders.is_empty(),
        "{rule}:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn every_source_file_opens_by_saying_what_it_owns() {
    let missing = sources()
        .into_iter()
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(path, _)| path)
        .collect();
    fail("these files do not open with a `//!` comment", missing);
}

#[test]
fn databases_are_used_only_inside_the_store() {
    for client in ["rusqlite", "postgres::"] {
        let outside = sources()
            .into_iter()
            .filter(|(path, text)| !path.starts_with("src/store/") && code(text).contains(client))
            .map(|(path, _)| path)
            .collect();
        fail(&format!("{client} is used outside src/store/"), outside);
    }
}

/// Where gRPC and protobuf types may appear: the service and server layers,
/// the generated code, and the gRPC health prober with its test peer.
const GRPC_ALLOWED: &[&str] = &[
    "src/service/",
    "src/cli/",
    "src/server.rs",
    "src/transport.rs",
    "src/pb.rs",
    "src/probe/grpc.rs",
    "src/probe/tests.rs",
];

#[test]
fn grpc_types_stay_in_the_service_and_server_layers() {
    let words = ["tonic", "prost", "crate::pb", "pb::"];
    let outside = sources()
        .into_iter()
        .filter(|(path, _)| !GRPC_ALLOWED.iter().any(|a| path.starts_with(a)))
        .filter_map(|(path, text)| {
            let code = code(&text);
            let found: Vec<_> = words.iter().filter(|w| code.contains(*w)).collect();
            (!found.is_empty()).then(|| format!("{path}: {found:?}"))
        })
        .collect();
    fail(
        "gRPC types are used outside the service and server layers",
        outside,
    );
}

/// The layers, bottom first. A module may use its own layer and those
/// beneath it, never one above: the store knows no engine, the engine no
/// monitor or service, and nothing but the binary and the server knows the
/// server. `config` sits just below the service: it assembles every lower
/// layer's settings from the command line, and the service reads its own.
/// The prober (`probe`) is low, checking hosts it is given; the checker
/// above it picks each connection's check and secret.
const LAYERS: &[&[&str]] = &[
    &["lifecycle", "pb"],
    &["connection", "error", "files", "metrics"],
    &["probe"],
    &["kinds", "definitions", "secrets", "reload"],
    &["access", "store"],
    &["credentials"],
    &["probe/checker"],
    &["engine"],
    &["watch", "monitor"],
    &["transport", "config"],
    &["service", "admin"],
    &["server", "backup", "cli", "lib", "main"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/tidy.rs: add it"))
}

#[test]
fn each_module_uses_only_the_layers_beneath_it() {
    let mut upward = Vec::new();
    for (path, text) in sources() {
        let own = module(&path);
        let mine = layer(own);
        let code = code(&text);
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            assert!(
                !rest.starts_with('{'),
                "{path}: name each module in its own `use crate::module::...`, so this test sees it"
            );
            let used: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // Items at the crate root (`crate::Error`) are re-exports.
            if used.is_empty() || used == own || used.chars().next().unwrap().is_uppercase() {
                continue;
            }
            if layer(&used) > mine {
                upward.push(format!("{path} ({own}) uses {used}"));
            }
        }
    }
    upward.sort();
    upward.dedup();
    fail("a module uses a layer above its own", upward);
}

#[test]
fn the_checks_themselves_can_fail() {
    assert_eq!(module("src/store/query.rs"), "store");
    assert_eq!(module("src/engine/create.rs"), "engine");
    assert_eq!(module("src/probe/checker.rs"), "probe/checker");
    assert_eq!(module("src/lib.rs"), "lib");
    assert!(code("// rusqlite\nlet x = 1; // tonic").trim() == "let x = 1;");
    assert!(layer("store") < layer("engine"));
    assert!(layer("engine") < layer("monitor"));
}
