//! `meshctl`'s command line, run as a user runs it: help and version exit 0, usage errors
//! exit 2 naming what was wrong, completions for bash, zsh and fish, and a runtime failure
//! exits 1 naming the command.

use std::process::{Command, Output};

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("run meshctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn help_and_version_exit_zero() {
    let o = meshctl(&["--help"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    for sub in ["serve", "validate", "dump", "certs", "stat", "completions"] {
        assert!(out.contains(sub), "--help lists {sub}: {out}");
    }
    for sub in ["serve", "validate", "dump", "certs", "stat", "completions"] {
        let o = meshctl(&[sub, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{sub} --help: {:?}", text(&o));
        assert!(text(&o).0.contains("Usage: meshctl"), "{sub} --help");
    }
    let o = meshctl(&["stat", "--help"]);
    assert!(text(&o).0.contains("--by-route"));
    let o = meshctl(&["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        text(&o).0.trim(),
        format!("meshctl {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_two_naming_the_problem() {
    for (args, want) in [
        (&["stat", "--bogus", "127.0.0.1:1"][..], "--bogus"),
        (&["stat"][..], "ADMIN_ADDR"),
        (&["stat", "not-an-address"][..], "not-an-address"),
        (&["stat", "--window", "soon", "127.0.0.1:1"][..], "soon"),
        (
            &["certs", "--out", "x", "just-a-name"][..],
            "NAMESPACE/SERVICE_ACCOUNT",
        ),
        (&["serve", "--cert-ttl", "1h"][..], "--sds"),
        (&["frobnicate"][..], "frobnicate"),
    ] {
        let o = meshctl(args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?} names {want}: {err}");
    }
}

#[test]
fn completions_for_three_shells() {
    for (shell, marker) in [
        ("bash", "_meshctl()"),
        ("zsh", "#compdef meshctl"),
        ("fish", "complete -c meshctl"),
    ] {
        let o = meshctl(&["completions", shell]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{shell}: {err}");
        assert!(
            out.contains(marker),
            "{shell}: {}",
            &out[..out.len().min(200)]
        );
        assert!(out.contains("by-route"), "{shell} completes stat's flags");
    }
}

#[test]
fn runtime_failures_exit_one_naming_the_command() {
    // Nothing listens on port 1.
    let o = meshctl(&["stat", "127.0.0.1:1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("meshctl stat") && err.contains("127.0.0.1:1"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("meshctl-cli-{}", std::process::id()));
    let o = meshctl(&["validate", dir.join("missing.yaml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    assert!(text(&o).0.contains("missing.yaml"), "{:?}", text(&o));
}
