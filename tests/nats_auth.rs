//! NATS credentials and TLS from files, against real nats-server processes of our own (a free
//! loopback port each, stopped on drop): a token, a user's password, and TLS with our own CA. A
//! rejected credential is a configuration error (exit 2 from the CLI), never retried as an outage.
//! And the subject permissions README "Reloads over NATS" gives for reload requests.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use cdc_egress::config::{NatsAuth, NatsConfig, SecretUrl};
use cdc_egress::sink::notify::Notifier;

/// A nats-server with JetStream on a free loopback port, with extra arguments; killed on drop.
struct Server {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server on a free port. A port can be taken between probing and binding (by
    /// another test's server or a client's source port), and a loaded machine starts slowly: a
    /// server that exits or does not listen within 15 s is retried on another port, twice; then
    /// the test fails with the server's log.
    fn start(args: &[&str]) -> Server {
        let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("nats-server");
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap().port()
            };
            let log = dir.path().join("server.log");
            let mut child = std::process::Command::new(bin)
                .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
                .arg(dir.path())
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("nats-server (apt-get install nats-server)");
            for _ in 0..300 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Server {
                        child,
                        port,
                        _dir: dir,
                    };
                }
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("nats-server {args:?} did not start on three ports; its last log:\n{last_log}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: String, auth: NatsAuth) -> NatsConfig {
    NatsConfig {
        url: Some(SecretUrl::new(url)),
        stream: common::unique("natsauth").to_uppercase(),
        subject_prefix: common::unique("natsauth"),
        source: "main".into(),
        change_events: cdc_egress::config::ChangeEvents::Off,
        txn_events: false,
        schema_bucket: None,
        control_subject: None,
        auth,
    }
}

fn secret_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{text}\n")).unwrap();
    p
}

async fn connect(cfg: &NatsConfig) -> Result<Notifier, cdc_egress::error::Error> {
    Notifier::connect(cfg).await.map(|n| n.expect("a notifier"))
}

#[tokio::test]
async fn a_token_from_a_file_is_used_and_a_wrong_one_is_a_configuration_error() {
    let s = Server::start(&["--auth", "t0ken-Secret"]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{}", s.port);
    let good = NatsAuth {
        token_file: Some(secret_file(dir.path(), "token", "t0ken-Secret")),
        ..Default::default()
    };
    connect(&config(url.clone(), good)).await.unwrap();
    let bad = NatsAuth {
        token_file: Some(secret_file(dir.path(), "bad", "wrong")),
        ..Default::default()
    };
    let err = connect(&config(url.clone(), bad)).await.err().unwrap();
    assert!(err.is_config(), "{err}");
    assert!(!err.is_transient(), "{err}");
    assert!(!err.to_string().contains("t0ken-Secret"), "{err}");
    // No credentials at all, through the binary: exit 2 (configuration), not a retried outage.
    let cwd = tempfile::tempdir().unwrap();
    let (code, _, err) = common::run_cli_timeout(
        &["notices"],
        &[
            (
                "CDC_EGRESS_SOURCE_URL".into(),
                "postgres://postgres@127.0.0.1:1/x".into(),
            ),
            ("CDC_EGRESS_NATS_URL".into(), url),
        ],
        cwd.path(),
        Duration::from_secs(60),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("rejected the credentials"), "{err}");
}

#[tokio::test]
async fn a_users_password_comes_from_a_file() {
    let s = Server::start(&["--user", "egress", "--pass", "Pa55-file"]);
    let dir = tempfile::tempdir().unwrap();
    let auth = NatsAuth {
        password_file: Some(secret_file(dir.path(), "pw", "Pa55-file")),
        ..Default::default()
    };
    connect(&config(
        format!("nats://egress@127.0.0.1:{}", s.port),
        auth.clone(),
    ))
    .await
    .unwrap();
    // The user name must be in the URL.
    let err = connect(&config(format!("nats://127.0.0.1:{}", s.port), auth))
        .await
        .err()
        .unwrap();
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("nats.password_file"), "{err}");
}

/// TLS with a CA of our own (made here with openssl): trusted through `nats.tls_ca_file`; without
/// it the handshake fails.
#[tokio::test]
async fn tls_with_our_own_ca_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        let ok = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            ok.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=cdct-ca");
    sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1");
    sh("printf 'subjectAltName=IP:127.0.0.1\\n' > ext.cnf && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 1 -extfile ext.cnf");
    let s = Server::start(&[
        "--tls",
        "--tlscert",
        d.join("server.pem").to_str().unwrap(),
        "--tlskey",
        d.join("server.key").to_str().unwrap(),
    ]);
    let url = format!("tls://127.0.0.1:{}", s.port);
    let trusted = NatsAuth {
        tls_ca_file: Some(d.join("ca.pem")),
        ..Default::default()
    };
    connect(&config(url.clone(), trusted)).await.unwrap();
    assert!(
        connect(&config(url, NatsAuth::default())).await.is_err(),
        "a server certificate of an unknown CA is not trusted"
    );
}

/// The permissions of README "Reloads over NATS", on a server of our own: the daemon runs under
/// its user (notices, stream, schema bucket, answering requests), a user allowed to publish on the
/// control subject gets its reload, and one that is not allowed cannot place a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_requests_follow_the_readme_permissions() {
    let db = common::TestDb::new("natsperm").await;
    let c = db.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE public.t (id int PRIMARY KEY); CREATE TABLE public.u (id int PRIMARY KEY); \
         CREATE PUBLICATION {} FOR TABLE public.t, public.u",
        db.publication
    ))
    .await
    .unwrap();
    let (prefix, source, bucket) = (&db.prefix, &db.slot, format!("{}_SCHEMAS", db.stream));
    let control = format!("{prefix}-control.{source}.reload");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(
        &conf,
        format!(
            r#"authorization {{
  users = [
    {{ user: cdc-egress, password: daemon-pw, permissions: {{
        publish:   {{ allow: ["{prefix}.>", "$JS.API.>", "$KV.{bucket}.>", "_INBOX.>"] }}
        subscribe: {{ allow: ["{control}", "_INBOX.>"] }}
        allow_responses: true }} }}
    {{ user: ops, password: ops-pw, permissions: {{
        publish:   {{ allow: ["{prefix}-control.*.reload"] }}
        subscribe: {{ allow: ["_INBOX.>"] }} }} }}
    {{ user: app, password: app-pw, permissions: {{
        publish:   {{ allow: ["$JS.API.CONSUMER.>", "$JS.API.STREAM.INFO.>", "$JS.API.DIRECT.GET.>", "$JS.ACK.>"] }}
        subscribe: {{ allow: ["_INBOX.>", "{prefix}.>"] }} }} }}
  ]
}}
"#
        ),
    )
    .unwrap();
    let s = Server::start(&["-c", conf.to_str().unwrap()]);
    let mut env = db.daemon_env(&db.out_url());
    env.retain(|(k, _)| k != "CDC_EGRESS_NATS_URL");
    env.push((
        "CDC_EGRESS_NATS_URL".into(),
        format!("nats://cdc-egress@127.0.0.1:{}", s.port),
    ));
    env.push((
        "CDC_EGRESS_NATS_PASSWORD_FILE".into(),
        secret_file(dir.path(), "pw", "daemon-pw")
            .display()
            .to_string(),
    ));
    env.push(("CDC_EGRESS_NATS_CONTROL".into(), "true".into()));
    let mut d = common::Daemon::start(&env, db.dir.path(), &[], "daemon.log");
    d.wait_for_log(
        "answering reload requests over NATS",
        Duration::from_secs(120),
    )
    .await;
    let as_user = |user: &str, pw: &str| {
        let url = format!("nats://127.0.0.1:{}", s.port);
        let (user, pw) = (user.to_string(), pw.to_string());
        async move {
            async_nats::ConnectOptions::with_user_and_password(user, pw)
                .connect(url)
                .await
                .unwrap()
        }
    };
    // Not allowed: the server drops the request. After the flush the server has handled it, so
    // had it been let through it would reach the daemon before the allowed request below.
    let app = as_user("app", "app-pw").await;
    app.publish_with_reply(
        control.clone(),
        "_INBOX.app",
        r#"{"tables": ["public.u"]}"#.into(),
    )
    .await
    .unwrap();
    app.flush().await.unwrap();
    let ops = as_user("ops", "ops-pw").await;
    let reply = tokio::time::timeout(
        Duration::from_secs(120),
        ops.request(control.clone(), r#"{"tables": ["public.t"]}"#.into()),
    )
    .await
    .expect("a reply")
    .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    let requested =
        common::query_rows(&c, "SELECT table_name FROM cdc_egress.reload_requests").await;
    assert_eq!(requested, ["(t)"], "only the allowed request was placed");
    assert!(d.stop().await.success());
    db.cleanup().await;
}

/// A message larger than the server's `max_payload` is a configuration error that names the
/// setting (definite: retrying would send the same message again), not an outage retried forever.
#[tokio::test]
async fn a_message_over_the_servers_max_payload_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let conf = secret_file(dir.path(), "small.conf", "max_payload: 2048");
    let s = Server::start(&["-c", conf.to_str().unwrap()]);
    let cfg = config(format!("nats://127.0.0.1:{}", s.port), NatsAuth::default());
    let n = connect(&cfg).await.unwrap();
    let subject = format!("{}.main.test", cfg.subject_prefix);
    n.publish_once(&subject, "small-1", vec![b'x'; 1000].into())
        .await
        .unwrap();
    let err = n
        .publish_once(&subject, "large-1", vec![b'x'; 4096].into())
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.is_config(), "{err}");
    assert!(err.to_string().contains("max_payload"), "{err}");
}
