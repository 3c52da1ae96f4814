//! Start-up errors as an operator sees them: one line that names the setting and what to
//! check, never a debug dump, and never a secret of the URL.

use std::process::{Command, Output};
use std::time::Duration;

/// Runs a binary of the workspace with `env` only (plus PATH), and waits for it to exit.
fn run(binary: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(testkit::procs::bin(binary));
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command.envs(env.iter().copied());
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("exited within 60 s")
        .expect("output")
}

/// Everything it printed, as lines.
fn lines(output: &Output) -> Vec<String> {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.lines().map(str::to_owned).collect()
}

const BASE: [(&str, &str); 4] = [
    ("JWT_SECRET", "startup-test-secret-of-32-bytes-at-least"),
    ("PORT", "0"),
    ("METRICS_PORT", "0"),
    ("HOST", "127.0.0.1"),
];

#[test]
fn a_redis_url_that_is_not_one_is_named_in_one_line_without_its_password() {
    for (binary, url) in [
        ("gateway", "http://user:hunter2@127.0.0.1:6379"),
        ("gateway", "127.0.0.1:6379"),
        ("persister", "http://user:hunter2@127.0.0.1:6379"),
    ] {
        let mut env = BASE.to_vec();
        env.extend([("REDIS_URL", url), ("MONGODB_URI", "mongodb://127.0.0.1:1")]);
        let output = run(binary, &env);
        assert!(!output.status.success(), "{binary} {url}");
        let lines = lines(&output);
        assert_eq!(lines.len(), 1, "{binary} {url}: {lines:#?}");
        assert!(
            lines[0].contains("REDIS_URL") && lines[0].contains("redis://"),
            "{}",
            lines[0]
        );
        assert!(!lines[0].contains("hunter2"), "{}", lines[0]);
    }
}

#[test]
fn a_mongodb_that_does_not_answer_is_named_in_one_line() {
    let free = testkit::servers::free_port().to_string();
    let uri = format!("mongodb://127.0.0.1:{free}");
    let mut env = BASE.to_vec();
    env.extend([("REDIS_URL", "redis://127.0.0.1:1"), ("MONGODB_URI", &uri)]);
    let output = run("gateway", &env);
    assert!(!output.status.success());
    let lines = lines(&output);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("MONGODB_URI"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("no MongoDB server answered at 127.0.0.1:{free}")),
        "{}",
        lines[0]
    );
    assert!(lines[0].len() < 250, "{} characters", lines[0].len());
    // Not a terminal: no colour codes.
    assert!(!lines[0].contains('\u{1b}'), "{}", lines[0]);
}

#[test]
fn a_rate_below_zero_is_refused() {
    let mut env = BASE.to_vec();
    env.push(("EVENTS_PER_SECOND", "-1"));
    let output = run("gateway", &env);
    assert!(!output.status.success());
    let text = lines(&output).join("\n");
    assert!(
        text.contains("EVENTS_PER_SECOND") || text.contains("--events-per-second"),
        "{text}"
    );
}
