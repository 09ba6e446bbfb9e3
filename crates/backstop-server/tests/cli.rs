//! The `backstop` binary itself: `check-config`, `--listen` from the
//! environment, and a clean exit on SIGTERM.

// Test helpers panic to report failure, as the tests do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_backstop");

fn check(name: &str, toml: &str) -> (bool, String) {
    let dir = std::env::temp_dir().join(format!("backstop-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_the_default_and_names_bad_fields() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/backstop.toml");
    let out = Command::new(BIN)
        .args(["check-config", default])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let (ok, text) = check(
        "http2",
        "[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\nhttp2 = \"yes\"\n",
    );
    assert!(!ok);
    assert!(text.contains("targets[0].http2"), "{text}");
    let (ok, text) = check("server", "[server]\nlisten = \"127.0.0.1:0\"\nmax_body = 1\n[[targets]]\nname = \"a\"\nbase_url = \"http://x/v1\"\n");
    assert!(!ok);
    assert!(text.contains("server.max_body"), "{text}");
}

#[test]
fn runs_from_the_environment_and_exits_cleanly_on_sigterm() {
    let mut child = Command::new(BIN)
        .env("BACKSTOP_LISTEN", "127.0.0.1:0")
        .env("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
        .env_remove("OPENAI_API_KEY")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let addr = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.split("listening on http://")
                .nth(1)
                .map(|a| a.trim().to_string())
        })
        .expect("the binary says where it listens");
    let health = std::net::TcpStream::connect(&addr);
    assert!(health.is_ok(), "listening on {addr}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("backstop did not exit within 5 s of SIGTERM");
}
