//! Liveness: `<prefix>/machines/<name>/alive` exists while that machine's agent holds its
//! lease (and `<prefix>/claims/<name>/alive` while a held claim's holder renews it). Readers list the keys (keys only, cheap); the agent writes its key through
//! [`crate::Lease::put_attached`].

use std::collections::BTreeSet;

use etcd_client::GetOptions;

use crate::connection::Store;
use crate::error::Result;
use crate::keys::Part;

impl Store {
    /// Names of machines whose agent is alive now.
    pub async fn alive_machines(&self) -> Result<BTreeSet<String>> {
        self.alive_names("machines").await
    }

    /// Names of the objects of kind `plural` whose `alive` key exists (is held on a lease now).
    pub(crate) async fn alive_names(&self, plural: &str) -> Result<BTreeSet<String>> {
        let prefix = self.keys.kind(plural);
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
                match self.keys.parse(plural, &key) {
                    Some((name, Part::Alive)) => Some(name.to_string()),
                    _ => None,
                }
            })
            .collect())
    }
}
