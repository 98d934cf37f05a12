//! A PostgreSQL server for tests: the one `HARVEST_TEST_PG` names (a connection URL), else
//! a throwaway cluster started here from the installed binaries (fsync off, a Unix socket
//! in a temporary folder, no TCP), stopped and removed when the test process exits.
//! Without either, the tests that need it say SKIPPED loudly, unless
//! `HARVEST_REQUIRE_PG=1` (CI), where a missing server fails them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use harvest_supervisor::store::{PostgresOptions, PostgresStore};

/// A running server.
pub struct TestPg {
    /// How to connect (libpq key-value or URL form).
    pub url: String,
    /// The cluster's folder, when this process started it (for `pg_ctl restart`).
    pub data: Option<PathBuf>,
    /// The binaries' folder, when this process started it.
    pub bin: Option<PathBuf>,
}

impl TestPg {
    /// Runs `pg_ctl <args>` on a cluster started here (`false` if there is none or it
    /// failed): `restart`, `stop`, `start`.
    pub fn ctl(&self, args: &[&str]) -> bool {
        let (Some(bin), Some(data), Some(dir)) = (&self.bin, &self.data, self.socket_dir()) else {
            return false;
        };
        let settings = server_settings(&dir.display().to_string());
        let mut all: Vec<String> = vec![
            "-D".into(),
            data.display().to_string(),
            "-l".into(),
            dir.join("log").display().to_string(),
            "-o".into(),
            settings,
            "-w".into(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join("pg_ctl"));
            c
        } else {
            Command::new(bin.join("pg_ctl"))
        };
        cmd.args(&all)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The socket folder of a cluster started here.
    pub fn socket_dir(&self) -> Option<PathBuf> {
        self.data
            .as_ref()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf)
    }
}

/// A role that must give its password ([`PASSWORD`]) on a cluster started here.
pub const PASSWORD_ROLE: &str = "harvest_pw";
/// Its password.
pub const PASSWORD: &str = "right-password";

static SERVER: OnceLock<Result<TestPg, String>> = OnceLock::new();

/// The server, or `None` after printing why the calling test is skipped (a panic instead
/// when `HARVEST_REQUIRE_PG` is set).
pub fn server(test: &str) -> Option<&'static TestPg> {
    match SERVER.get_or_init(start) {
        Ok(pg) => Some(pg),
        Err(why) => {
            if std::env::var_os("HARVEST_REQUIRE_PG").is_some() {
                panic!("{test}: PostgreSQL is required (HARVEST_REQUIRE_PG) but: {why}");
            }
            eprintln!(
                "\n**********\nSKIPPED {test}: no PostgreSQL ({why}); set HARVEST_TEST_PG to a \
                 server's URL or install postgresql\n**********\n"
            );
            None
        }
    }
}

/// A schema name no other test of this run uses.
pub fn fresh_schema() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "t{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl TestPg {
    /// Options for a fresh schema of its own.
    pub fn options(&self) -> PostgresOptions {
        PostgresOptions::from_url(&self.url)
            .expect("test URL")
            .schema(fresh_schema())
    }

    /// A store in a fresh schema of its own.
    pub async fn store(&self) -> PostgresStore {
        PostgresStore::connect_with(self.options())
            .await
            .expect("connect to the test server")
    }

    /// Runs SQL through `psql` (setup that the store must not do itself).
    pub fn psql(&self, sql: &str) {
        let out = Command::new("psql")
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-d", &self.url, "-c", sql])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn start() -> Result<TestPg, String> {
    if let Ok(url) = std::env::var("HARVEST_TEST_PG")
        && !url.is_empty()
    {
        return Ok(TestPg {
            url,
            data: None,
            bin: None,
        });
    }
    let bin = binaries().ok_or("no initdb/pg_ctl found (package postgresql)")?;
    let root = std::env::temp_dir().join(format!("harvest-pg-{}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    let data = root.join("data");
    // initdb refuses to run as root: then the cluster belongs to the `postgres` user.
    let as_root = is_root();
    if as_root {
        let ok = Command::new("chown")
            .args(["postgres:postgres", &root.display().to_string()])
            .status()
            .map_err(|e| format!("chown: {e}"))?
            .success();
        if !ok {
            return Err("cannot hand the cluster folder to the postgres user".into());
        }
    }
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let mut cmd = if as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed: {}",
                program.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let data_s = data.display().to_string();
    let root_s = root.display().to_string();
    run(
        &bin.join("initdb"),
        &[
            "-D",
            &data_s,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    )?;
    // One role must give a password (scram), so that a wrong one can be tested; every
    // other connection is trusted.
    let hba = data.join("pg_hba.conf");
    let trusted = std::fs::read_to_string(&hba).map_err(|e| format!("pg_hba.conf: {e}"))?;
    std::fs::write(
        &hba,
        format!("local all {PASSWORD_ROLE} scram-sha-256\n{trusted}"),
    )
    .map_err(|e| format!("pg_hba.conf: {e}"))?;
    let settings = server_settings(&root_s);
    run(
        &bin.join("pg_ctl"),
        &[
            "-D",
            &data_s,
            "-l",
            &format!("{root_s}/log"),
            "-o",
            &settings,
            "-w",
            "-t",
            "60",
            "start",
        ],
    )?;
    reap_at_exit(&bin, &root, as_root);
    let url = format!("host={root_s} port=5432 user=postgres dbname=postgres");
    wait_ready(&url)?;
    let pg = TestPg {
        url,
        data: Some(data),
        bin: Some(bin),
    };
    let create = format!(
        "CREATE ROLE {PASSWORD_ROLE} LOGIN PASSWORD '{PASSWORD}'; \
         GRANT CREATE ON DATABASE postgres TO {PASSWORD_ROLE}"
    );
    let out = Command::new("psql")
        .args(["-q", "-d", &pg.url, "-c", &create])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "creating the password role: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(pg)
}

/// The server's settings: no TCP, the socket in `dir`, no waiting for the disk.
fn server_settings(dir: &str) -> String {
    format!(
        "-c listen_addresses='' -c unix_socket_directories='{dir}' -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
}

/// The folder of `initdb` and `pg_ctl`: Debian keeps them out of `PATH`.
fn binaries() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    versions.sort();
    if let Some(newest) = versions.pop() {
        return Some(newest);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A watcher outside this process stops the cluster and removes its folder once this
/// process has exited (statics are never dropped, and a killed test runs no destructor).
fn reap_at_exit(bin: &Path, root: &Path, as_root: bool) {
    let pg_ctl = bin.join("pg_ctl").display().to_string();
    let data = root.join("data").display().to_string();
    let stop = if as_root {
        format!("runuser -u postgres -- {pg_ctl} -D {data} -m immediate stop")
    } else {
        format!("{pg_ctl} -D {data} -m immediate stop")
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {root}",
        pid = std::process::id(),
        root = root.display()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Checks that the cluster answers (`pg_ctl start -w` has waited until it accepts
/// connections: no polling here).
fn wait_ready(url: &str) -> Result<(), String> {
    let out = Command::new("psql")
        .args(["-q", "-d", url, "-c", "SELECT 1"])
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "the cluster does not accept connections: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
