//! Where the project's binaries are: built by cargo for a test, or next to a bench.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The coordinator binary (`segprop-coord serve`, the job CLI).
pub const COORDINATOR: &str = "segprop-coord";
/// The worker binary (`segprop-worker serve`, `train`).
pub const WORKER: &str = "segprop-worker";

/// The packages [`Binaries::build`] builds: the two binaries above and the bench (`segprop-bench`).
const PACKAGES: [&str; 3] = ["segprop-worker", "segprop-coordinator", "segprop-bench"];

/// The directory that holds the project's binaries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// The binaries in `dir`, as they are.
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// For a test executable (cargo puts it in `target/<profile>/deps/`): builds the
    /// coordinator, worker and bench binaries of the workspace at `workspace` into
    /// `target/<profile>` with the running cargo (`$CARGO`), `--release` when the test is a
    /// release build. Builds once per process; later calls return the first call's outcome.
    pub fn build(workspace: &Path) -> anyhow::Result<Self> {
        static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        let built = BUILT.get_or_init(|| build(workspace).map_err(|e| format!("{e:#}")));
        match built {
            Ok(dir) => Ok(Self::in_dir(dir)),
            Err(e) => bail!("{e}"),
        }
    }

    /// The directory of the running executable, which must hold `segprop-coord` and
    /// `segprop-worker` (a bench run from `target/<profile>/`).
    pub fn beside_current_exe() -> anyhow::Result<Self> {
        let here = std::env::current_exe().context("cannot locate the running executable")?;
        let dir = here
            .parent()
            .context("the running executable has no directory")?;
        let binaries = Self::in_dir(dir);
        for name in [COORDINATOR, WORKER] {
            let path = binaries.path(name);
            if !path.is_file() {
                bail!(
                    "{} is missing: build the binaries next to this one (cargo build --release \
                     -p segprop-coordinator -p segprop-worker -p segprop-bench)",
                    path.display()
                );
            }
        }
        Ok(binaries)
    }

    /// Where binary `name` is (or would be) in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }

    /// Binary `name`, which must exist.
    pub fn get(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.path(name);
        if !path.is_file() {
            bail!("{} is missing", path.display());
        }
        Ok(path)
    }
}

/// `cargo build` of [`PACKAGES`] for the test executable running now; the directory it built into.
fn build(workspace: &Path) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the test executable")?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the test executable is not in target/<profile>/deps")?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"])
        .args(PACKAGES.iter().flat_map(|p| ["-p", p]))
        .current_dir(workspace);
    // `cargo test` gives this process the package's CARGO_MANIFEST_DIR, CARGO_PKG_* and
    // friends. Passed on, they change the fingerprint of build scripts that watch them
    // (ring's reruns on CARGO_MANIFEST_DIR), and this build would recompile ring, rustls,
    // tonic and everything above them that `cargo test` had just built.
    for (key, _) in std::env::vars_os() {
        if is_cargo_test_env(&key.to_string_lossy()) {
            cmd.env_remove(&key);
        }
    }
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("cannot run cargo to build the binaries")?;
    if !status.success() {
        bail!("building the binaries failed ({status})");
    }
    Ok(dir)
}

/// Whether `key` is one of the variables `cargo test` sets for the package under test (which
/// must not reach a nested `cargo build`).
fn is_cargo_test_env(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || [
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_BIN_NAME",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nested_build_keeps_cargo_but_not_the_package_under_test() {
        for key in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_TARGET_TMPDIR",
            "OUT_DIR",
        ] {
            assert!(is_cargo_test_env(key), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "PATH",
            "RUSTFLAGS",
        ] {
            assert!(!is_cargo_test_env(key), "{key}");
        }
    }

    #[test]
    fn binaries_are_named_in_their_directory() {
        let dir = tempfile::tempdir().unwrap();
        let binaries = Binaries::in_dir(dir.path());
        let coord = binaries.path(COORDINATOR);
        assert_eq!(coord.parent(), Some(dir.path()));
        assert!(binaries.get(COORDINATOR).is_err());
        std::fs::write(&coord, b"").unwrap();
        assert_eq!(binaries.get(COORDINATOR).unwrap(), coord);
    }
}
