//! Authentication during startup: trust, cleartext password, MD5 and SCRAM-SHA-256 without channel
//! binding (we announce `n,,`, which a server offering SCRAM-SHA-256-PLUS accepts too). GSSAPI, SSPI
//! and Kerberos are refused with a definite error that says so. Every failure here is definite and
//! names the peer and the user; a password the server rejects (SQLSTATE class 28) is reported as a
//! credentials problem (exit code 2), like a password the configuration lacks.

use std::io;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{
    Message, AUTHENTICATION_TAG, ERROR_RESPONSE_TAG, NOTICE_RESPONSE_TAG,
};
use postgres_protocol::message::frontend;
use tokio_postgres::fallible_iterator::FallibleIterator;

use crate::error::{Component, Error};
use crate::pg::conninfo::ConnInfo;

use super::backend::{error_from_response, log_notice};
use super::frame::{not_a, protocol_error};
use super::{ReplicationConnection, COMPONENT};

impl ReplicationConnection {
    pub(super) async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), Error> {
        let peer = self.reader.peer.clone();
        let auth_err = |msg: String| {
            Error::definite(
                COMPONENT,
                format!("authenticating to {peer} as {}: {msg}", info.user()),
            )
        };
        let password = || {
            info.password().ok_or_else(|| {
                Error::definite(
                    Component::Config,
                    format!(
                        "authenticating to {peer} as {}: {}",
                        info.user(),
                        crate::error::NO_PASSWORD
                    ),
                )
            })
        };
        let build_err = |e: io::Error| auth_err(format!("building message: {e}"));
        let malformed = |e: io::Error| {
            protocol_error(&peer, format_args!("malformed authentication request: {e}"))
        };
        let unsupported = |name: &str, code: i32| {
            Err(auth_err(format!(
                "unsupported authentication method {name} ({code})"
            )))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.reader.frame().await?;
            match frame.tag {
                AUTHENTICATION_TAG => {}
                ERROR_RESPONSE_TAG => return Err(error_from_response(&peer, frame)),
                NOTICE_RESPONSE_TAG => {
                    log_notice(&peer, frame);
                    continue;
                }
                other => return Err(self.unexpected(other, "during authentication")),
            }
            match frame.parse().map_err(malformed)? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password()?.as_bytes(), &mut self.writer.buf)
                        .map_err(build_err)?
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash =
                        md5_hash(info.user().as_bytes(), password()?.as_bytes(), body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.writer.buf)
                        .map_err(build_err)?;
                }
                Message::AuthenticationSasl(body) => {
                    let mechanisms: Vec<String> = body
                        .mechanisms()
                        .map(|m| Ok(m.to_owned()))
                        .collect()
                        .map_err(malformed)?;
                    if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                        return Err(auth_err(format!(
                            "unsupported SASL mechanisms {mechanisms:?}"
                        )));
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        "SCRAM-SHA-256",
                        s.message(),
                        &mut self.writer.buf,
                    )
                    .map_err(build_err)?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| protocol_error(&peer, "SASL continue without SASL start"))?;
                    s.update(body.data())
                        .map_err(|e| auth_err(format!("SCRAM: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.writer.buf)
                        .map_err(build_err)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| protocol_error(&peer, "SASL final without SASL start"))?;
                    s.finish(body.data())
                        .map_err(|e| auth_err(format!("SCRAM server signature: {e}")))?;
                    continue; // AuthenticationOk follows
                }
                Message::AuthenticationKerberosV5 => return unsupported("Kerberos V5", 2),
                Message::AuthenticationScmCredential => return unsupported("SCM credentials", 6),
                Message::AuthenticationGss => return unsupported("GSSAPI", 7),
                Message::AuthenticationGssContinue(_) => return unsupported("GSSAPI", 8),
                Message::AuthenticationSspi => return unsupported("SSPI", 9),
                _ => return Err(malformed(not_a("authentication request"))),
            }
            self.writer.send_buf().await?;
        }
    }
}
