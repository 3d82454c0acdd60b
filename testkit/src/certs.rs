//! A throwaway certificate authority with a server certificate (localhost, 127.0.0.1) and a
//! client certificate (CN `cobalt`), written as PEM files into a temporary directory; more
//! client certificates by common name with [`TestCerts::client`] (etcd with authentication on
//! takes a client certificate's CN as the user).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

pub struct TestCerts {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = tempfile::Builder::new()
            .prefix("cobalt-certs-")
            .tempdir()
            .expect("create temp dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cobalt test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("CA cert");

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &ca).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "etcd",
        );
        let (client, client_key) = leaf(
            vec!["cobalt".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "cobalt",
        );
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write PEM")
        };
        write("ca.pem", &ca.pem());
        write("server.pem", &server);
        write("server-key.pem", &server_key);
        write("client.pem", &client);
        write("client-key.pem", &client_key);
        TestCerts { dir, ca }
    }

    /// A client certificate with common name `cn`: `(cert, key)` paths, `<cn>.pem` and
    /// `<cn>-key.pem`.
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec![cn.to_string()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("sign leaf");
        let (c, k) = (
            self.path(&format!("{cn}.pem")),
            self.path(&format!("{cn}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).expect("write PEM");
        std::fs::write(&k, key.serialize_pem()).expect("write PEM");
        (c, k)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
