//! Each subcommand shows (and takes) only the flags that apply to it.

mod common;

use common::imgcrypt;

#[test]
fn each_subcommand_lists_only_its_flags() {
    let registry_and_layer = [
        "--tls-verify",
        "--cert-dir",
        "--creds",
        "--authfile",
        "--layer",
        "--platform",
        "--concurrency",
    ];
    for cmd in [&["kp", "wrap"][..], &["kp", "unwrap"], &["keygen"], &["demo"]] {
        let mut args = cmd.to_vec();
        args.push("--help");
        let r = imgcrypt(&args);
        r.ok();
        for f in registry_and_layer {
            assert!(
                !r.stdout.contains(f),
                "{} --help lists {f}:\n{}",
                cmd.join(" "),
                r.stdout
            );
        }
    }
    let r = imgcrypt(&["encrypt", "--help"]);
    r.ok().stdout_has(&[
        "--tls-verify",
        "--cert-dir",
        "--src-cert-dir",
        "--creds",
        "--layer",
        "--concurrency",
    ]);
    imgcrypt(&["inspect", "--help"])
        .ok()
        .stdout_has(&["--tls-verify", "--cert-dir"]);
    // A registry flag is an error where it does not apply …
    imgcrypt(&["keygen", "--tls-verify=false", "k.pem"]).expect_code(2);
    // … and is taken before or after an image command (skopeo puts them after).
    for args in [
        &["--tls-verify=false", "inspect", "docker://127.0.0.1:1/x:v1"][..],
        &["inspect", "--tls-verify=false", "docker://127.0.0.1:1/x:v1"],
    ] {
        imgcrypt(args).expect_code(9).stderr_has(&["127.0.0.1:1"]);
    }
}
