//! Reload requests over NATS (`nats.control`): the running daemon answers request/reply messages on
//! `nats.control_subject` (default `<prefix>-control.<source>.reload`).
//!
//! A request is a JSON object naming the tables, `{"tables": ["public.orders", …]}` (or
//! `{"table": "public.orders"}`). It is handled exactly like `cdc-egress reload <tables>`: the same
//! function (`reload::request::request`) checks that the publication exists, the registry and the
//! marker trigger are current, each table exists, is published, is not the registry's own and has
//! no reload running, and then places the markers in one source transaction. So a reload requested
//! here takes the one path every reload takes (the WAL marker, invariant 3 of ARCHITECTURE.md) and
//! nothing here can reload a table the CLI would refuse. The reply is
//! `{"ok": true, "requests": [{"table": "public.orders", "request": "<id>"}]}`, or
//! `{"ok": false, "error": "<why>", "retry": <bool>}` (`retry`: the failure was transient, the same
//! request may succeed later); a malformed request gets an error reply and changes nothing.
//!
//! Requests are handled one at a time, in arrival order. The subscription is in the queue group
//! `cdc-egress`, so when several processes of one source subscribe, one of them answers. It belongs
//! to the session: only a daemon that streams answers, and a standby waiting for the slot does not.
//! Who may send requests is NATS's to decide (subject permissions, README "Reloads over NATS").

use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;

use crate::config::Config;
use crate::error::{Component, Error};

/// How long one request may take (two connections and a `COMMENT ON SCHEMA`) before it is
/// abandoned and answered "unknown" (it may have been placed just before).
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    table: Option<String>,
}

/// Answers reload requests on `subject` until the connection closes (then a transient error ends
/// the session, like any lost connection).
pub(super) async fn serve_reload_requests(
    client: async_nats::Client,
    subject: String,
    config: Arc<Config>,
) -> Result<(), Error> {
    // The subject names the source (checked by the configuration), so only this source's daemons
    // listen on it; their queue group makes one of them answer each request once.
    let group = format!("cdc-egress.{}", config.source.name);
    let mut requests = client
        .queue_subscribe(subject.clone(), group)
        .await
        .map_err(|e| {
            Error::caused_by(
                crate::error::Kind::Transient,
                Component::Nats,
                format!("NATS subscribe to {subject}"),
                e,
            )
        })?;
    tracing::info!(subject = %subject, "answering reload requests over NATS");
    while let Some(msg) = requests.next().await {
        let Some(reply) = msg.reply.clone() else {
            tracing::warn!(subject = %subject, "a reload request without a reply subject was ignored (use request/reply)");
            continue;
        };
        let received = std::time::Instant::now();
        let answer =
            match tokio::time::timeout(REQUEST_TIMEOUT, answer(&config, &msg.payload)).await {
                Ok(a) => a,
                Err(_) => {
                    tracing::warn!(
                    "a reload request over NATS took longer than {REQUEST_TIMEOUT:?}: abandoned"
                );
                    // It may have been placed just before: the requester must look, not retry.
                    unknown(
                        "the request took too long; it may or may not have been placed: \
                         check `cdc-egress status` before asking again",
                    )
                }
            };
        if received.elapsed() > REQUEST_TIMEOUT {
            tracing::warn!(
                "the reply to a reload request came after its requester's likely timeout"
            );
        }
        if let Err(e) = client.publish(reply, answer.into()).await {
            tracing::warn!(error = %e, "cannot send the reply to a reload request");
        }
    }
    Err(Error::transient(
        Component::Nats,
        format!("NATS subscription to {subject} ended (connection closed)"),
    ))
}

/// The reply to one request (see the module documentation).
async fn answer(config: &Config, payload: &[u8]) -> Vec<u8> {
    let reply = match parse(payload) {
        Err(why) => {
            tracing::warn!(error = %why, "malformed reload request over NATS");
            serde_json::json!({"ok": false, "error": why, "retry": false})
        }
        Ok(tables) => match crate::reload::request::request(config, &tables).await {
            Ok(placed) => {
                for (t, id) in &placed {
                    tracing::info!(table = %t, request = %id, "reload requested over NATS");
                }
                let requests: Vec<_> = placed
                    .iter()
                    .map(|(t, id)| serde_json::json!({"table": t.dotted(), "request": id}))
                    .collect();
                serde_json::json!({"ok": true, "requests": requests})
            }
            Err(e) => {
                tracing::warn!(error = %e, "reload request over NATS refused");
                // Validation errors (a table not published, a reload already running) are for the
                // requester; anything else (connections, servers) stays in the daemon's log.
                let error = if !e.is_transient()
                    && matches!(e.component(), Component::Config | Component::Reload)
                {
                    e.to_string()
                } else {
                    "the daemon could not place the request; its log says why".to_string()
                };
                serde_json::json!({"ok": false, "error": error, "retry": e.is_transient()})
            }
        },
    };
    serde_json::to_vec(&reply).expect("JSON serializes")
}

fn unknown(why: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"ok": false, "error": why, "retry": false}))
        .expect("JSON serializes")
}

/// The tables a request names, or why it is malformed.
fn parse(payload: &[u8]) -> Result<Vec<String>, String> {
    let req: ReloadRequest = serde_json::from_slice(payload).map_err(|e| {
        format!("malformed request ({e}): expected JSON like {{\"tables\": [\"public.orders\"]}}")
    })?;
    let mut tables = req.tables;
    tables.extend(req.table);
    if tables.is_empty() {
        return Err(
            "malformed request: name at least one table, {\"tables\": [\"schema.table\"]}".into(),
        );
    }
    Ok(tables)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn requests_name_tables() {
        assert_eq!(
            parse(br#"{"tables": ["public.a", "s.b"]}"#).unwrap(),
            ["public.a", "s.b"]
        );
        assert_eq!(parse(br#"{"table": "public.a"}"#).unwrap(), ["public.a"]);
        assert!(parse(b"public.a").unwrap_err().contains("malformed"));
        assert!(parse(br#"{"tables": []}"#)
            .unwrap_err()
            .contains("at least one"));
        assert!(parse(br#"{"tabels": ["x.y"]}"#).is_err());
    }
}
