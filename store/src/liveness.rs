//! Machine liveness: `<prefix>/machines/<name>/alive` exists while that machine's agent holds
//! its lease. Readers list the keys (keys only, cheap); the agent writes its key through
//! [`crate::Lease::put_attached`].

use std::collections::BTreeSet;

use etcd_client::GetOptions;

use crate::connection::Store;
use crate::error::Result;
use crate::keys::Part;

impl Store {
    /// Names of machines whose agent is alive now.
    pub async fn alive_machines(&self) -> Result<BTreeSet<String>> {
        let prefix = self.keys.kind("machines");
        let resp = self
            .call(self.client.kv_client().get(
                prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            ))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                match self.keys.parse("machines", &key) {
                    Some((name, Part::Alive)) => Some(name.to_string()),
                    _ => None,
                }
            })
            .collect())
    }
}
