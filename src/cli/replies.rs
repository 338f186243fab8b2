//! A request's reply as the commands read it: its fields as they came, or
//! decoded into the type this build expects.

use crate::client::{Client, ClientError};

use super::errors::failed;

/// Sends a request and returns a successful reply's fields as they came:
/// `--json` prints them whole, so nothing a newer daemon adds is lost.
pub async fn request_fields(
    client: &Client,
    request: &crate::protocol::Request,
    doing: &str,
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let reply = client
        .request(request)
        .await
        .map_err(|e| failed(doing, e))?;
    match reply.error {
        Some(error) => Err(failed(doing, ClientError::Refused(error))),
        None => Ok(reply.fields),
    }
}

/// A reply's fields as the type this build expects: a daemon of another
/// version may answer in another shape.
pub fn decode<T: serde::de::DeserializeOwned>(
    fields: serde_json::Map<String, serde_json::Value>,
    what: &str,
) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| {
        anyhow::anyhow!(
            "unexpected {what} reply from the daemon ({e}); `presence status` shows its version"
        )
    })
}
