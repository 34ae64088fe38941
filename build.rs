//! Embeds this crate's example migration set (`migrations/` and
//! `migrations_deferred/`) with the same std-only module a service's build
//! script uses through `diesel_rollout::embed`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

#[allow(dead_code, unused_imports)]
#[path = "src/source/mod.rs"]
mod source;

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    match source::embed::embed_to(
        &manifest.join("migrations"),
        &manifest.join("migrations_deferred"),
        &out.join("example_migrations.rs"),
        "crate",
    ) {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
