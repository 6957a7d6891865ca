//! Push and pull in one instance: hosted repositories with client auth, upstream filters,
//! catalog; real skopeo pushes and containerd pulls.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;
use tempfile::TempDir;

/// A mirror with hosted prefix `local`, users alice (may push) and bob (may not).
fn hosted_mirror(tmp: &TempDir, upstream_url: &str, anonymous_pull: bool) -> Mirror {
    let file = htpasswd(tmp.path(), &[("alice", "alice-pw"), ("bob", "bob-pw")]);
    Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\n[auth]\nhtpasswd = \"{}\"\nanonymous_pull = {anonymous_pull}\npush = [\"alice\"]\n\
             [upstreams.\"docker.io\"]\nurl = \"{upstream_url}\"\nallow = [\"library/*\"]\ndeny = [\"library/redis\"]\n",
            file.display()
        ),
    )
}

#[test]
fn skopeo_pushes_and_containerd_pulls_hosted_images() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let (index, amd) = layout.multiarch(300_000, 31);
    let layer = layout.layers(&amd)[0].clone();
    layout.push("amd", &format!("{}/library/app:1", up.host()), None);

    let mirror = hosted_mirror(&tmp, &up.url(), true);
    let host = format!("127.0.0.1:{}", mirror.port);
    // The layer enters the store through the cache first.
    let r = get(&format!(
        "{}/v2/docker.io/library/app/blobs/{layer}",
        mirror.url()
    ));
    assert_eq!(sha256_hex(&r.body), layer[7..]);

    layout.push(
        "multi",
        &format!("{host}/local/team/app:1"),
        Some("alice:alice-pw"),
    );
    mirror.settle();
    assert_eq!(
        mirror.store_files(&layer[7..]).len(),
        1,
        "pushed layer equal to the cached one: one file"
    );

    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", &host, &mirror.url(), Style::Ns);
    let got = ctr
        .pull("hosted", &hosts, &format!("{host}/local/team/app:1"))
        .expect("containerd pulls the hosted index");
    assert_eq!(got, index);

    // Without, with wrong, and with insufficient credentials.
    let start = format!("{}/v2/local/team/app/blobs/uploads/", mirror.url());
    let r = http("POST", &start, &[]);
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
    // A Bearer challenge, as Docker Hub and Distribution send: Docker skips a mirror
    // that answers with Basic.
    assert_eq!(
        r.header("www-authenticate"),
        Some(
            format!(
                "Bearer realm=\"{}/token\",service=\"entrepot\",scope=\"repository:local/team/app:pull,push\"",
                mirror.url()
            )
            .as_str()
        )
    );
    let r = http(
        "POST",
        &start,
        &[("Authorization", &basic("alice", "wrong"))],
    );
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
    let r = http(
        "POST",
        &start,
        &[("Authorization", &basic("bob", "bob-pw"))],
    );
    assert_eq!((r.status, r.oci_code().as_str()), (403, "DENIED"));
    let out = Command::new("skopeo")
        .args([
            "copy",
            "--dest-tls-verify=false",
            "--dest-creds",
            "alice:nope",
        ])
        .arg(format!("oci:{}:amd", layout.dir.display()))
        .arg(format!("docker://{host}/local/team/other:1"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "skopeo push with a wrong password fails"
    );

    // Pushing to a mirrored upstream: 405 naming the hosted prefix.
    let r = http(
        "POST",
        &format!("{}/v2/docker.io/library/app/blobs/uploads/", mirror.url()),
        &[("Authorization", &basic("alice", "alice-pw"))],
    );
    assert_eq!((r.status, r.oci_code().as_str()), (405, "UNSUPPORTED"));
    assert!(r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("push to local/"));
}

#[test]
fn hosted_push_api_uploads_mounts_tags_referrers_catalog() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let (layout, digest) = {
        let l = Layout::new(tmp.path());
        let d = l.build("t", &[("f", &noise(80_000, 33))]);
        l.push("t", &format!("{}/library/base:1", up.host()), None);
        (l, d)
    };
    let mirror = hosted_mirror(&tmp, &up.url(), true);
    let m = mirror.url();
    let alice = basic("alice", "alice-pw");
    let auth: &[(&str, &str)] = &[("Authorization", &alice)];

    // Chunked upload: POST, PATCH x2 with Content-Range, PUT ?digest=.
    let data = noise(200_000, 34);
    let d = format!("sha256:{}", sha256_hex(&data));
    let r = http("POST", &format!("{m}/v2/local/x/blobs/uploads/"), auth);
    assert_eq!((r.status, r.header("range")), (202, Some("0-0")));
    let loc = format!("{m}{}", r.header("location").unwrap());
    let r = send(
        &loc,
        "PATCH",
        &data[..120_000],
        &[("Authorization", &alice), ("Content-Range", "0-119999")],
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-119999")));
    let r = send(
        &loc,
        "PATCH",
        &data[..10],
        &[("Authorization", &alice), ("Content-Range", "5-14")],
    );
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (416, "BLOB_UPLOAD_INVALID"),
        "out-of-order chunk refused"
    );
    let r = send(
        &loc,
        "PATCH",
        &data[120_000..],
        &[
            ("Authorization", &alice),
            ("Content-Range", "120000-199999"),
        ],
    );
    assert_eq!(r.status, 202);
    let r = send(&format!("{loc}?digest={d}"), "PUT", b"", auth);
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (201, Some(d.as_str()))
    );
    assert_eq!(get(&format!("{m}/v2/local/x/blobs/{d}")).body, data);
    // A monolithic upload with the wrong digest is refused.
    let wrong = format!("sha256:{}", sha256_hex(b"other"));
    let r = send(
        &format!("{m}/v2/local/x/blobs/uploads/?digest={wrong}"),
        "POST",
        b"bytes",
        auth,
    );
    assert_eq!((r.status, r.oci_code().as_str()), (400, "DIGEST_INVALID"));

    // Mount a blob that came through the upstream cache.
    let layer = layout.layers(&digest)[0].clone();
    assert_eq!(
        get(&format!("{m}/v2/docker.io/library/base/blobs/{layer}")).status,
        200
    );
    let r = http(
        "POST",
        &format!("{m}/v2/local/y/blobs/uploads/?mount={layer}&from=docker.io/library/base"),
        auth,
    );
    assert_eq!(r.status, 201, "mounted from the cache");
    assert_eq!(
        sha256_hex(&get(&format!("{m}/v2/local/y/blobs/{layer}")).body),
        layer[7..]
    );
    assert_eq!(
        get(&format!("{m}/v2/local/x/blobs/{layer}")).status,
        404,
        "no cross-repo leak"
    );

    // A manifest must reference blobs the repository holds.
    let manifest = layout.blob(&digest);
    let mt = "application/vnd.oci.image.manifest.v1+json";
    let r = send(
        &format!("{m}/v2/local/x/manifests/1"),
        "PUT",
        &manifest,
        &[("Authorization", &alice), ("Content-Type", mt)],
    );
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    let config = serde_json::from_slice::<serde_json::Value>(&manifest).unwrap()["config"]
        ["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let r = send(
        &format!("{m}/v2/local/y/blobs/uploads/?digest={config}"),
        "POST",
        &layout.blob(&config),
        auth,
    );
    assert_eq!(r.status, 201);
    for tag in ["1", "2", "3"] {
        let r = send(
            &format!("{m}/v2/local/y/manifests/{tag}"),
            "PUT",
            &manifest,
            &[("Authorization", &alice), ("Content-Type", mt)],
        );
        assert_eq!(
            (r.status, r.header("docker-content-digest")),
            (201, Some(digest.as_str()))
        );
    }
    let r = get(&format!("{m}/v2/local/y/tags/list?n=2"));
    assert_eq!(r.json(), json!({"name": "local/y", "tags": ["1", "2"]}));
    assert_eq!(
        r.header("link"),
        Some("</v2/local/y/tags/list?n=2&last=2>; rel=\"next\"")
    );
    assert_eq!(
        get(&format!("{m}/v2/local/y/tags/list?n=2&last=2")).json()["tags"],
        json!(["3"])
    );

    // Referrers: an artifact whose subject is the image.
    let art = json!({"schemaVersion": 2, "mediaType": mt, "artifactType": "application/vnd.example.sbom",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": layout.blob(&config).len()},
        "layers": [], "subject": {"mediaType": mt, "digest": digest, "size": manifest.len()}});
    let art = serde_json::to_vec(&art).unwrap();
    let art_digest = format!("sha256:{}", sha256_hex(&art));
    let r = send(
        &format!("{m}/v2/local/y/manifests/{art_digest}"),
        "PUT",
        &art,
        &[("Authorization", &alice), ("Content-Type", mt)],
    );
    assert_eq!(
        (r.status, r.header("oci-subject")),
        (201, Some(digest.as_str()))
    );
    let refs = get(&format!("{m}/v2/local/y/referrers/{digest}")).json();
    assert_eq!(refs["manifests"][0]["digest"], art_digest.as_str());
    assert_eq!(
        refs["manifests"][0]["artifactType"],
        "application/vnd.example.sbom"
    );
    let none = get(&format!(
        "{m}/v2/local/y/referrers/{digest}?artifactType=other"
    ))
    .json();
    assert_eq!(none["manifests"], json!([]));

    // Delete a tag, then the manifest with its remaining tags.
    assert_eq!(
        http("DELETE", &format!("{m}/v2/local/y/manifests/3"), auth).status,
        202
    );
    assert_eq!(get(&format!("{m}/v2/local/y/manifests/3")).status, 404);
    assert_eq!(
        http(
            "DELETE",
            &format!("{m}/v2/local/y/manifests/{digest}"),
            auth
        )
        .status,
        202
    );
    assert_eq!(get(&format!("{m}/v2/local/y/manifests/1")).status, 404);
    assert_eq!(
        http("DELETE", &format!("{m}/v2/local/y/manifests/1"), &[]).status,
        401
    );

    // Catalog: hosted and cached repositories, paginated.
    let all = get(&format!("{m}/v2/_catalog")).json();
    assert_eq!(
        all["repositories"],
        json!(["docker.io/library/base", "local/x", "local/y"])
    );
    let r = get(&format!("{m}/v2/_catalog?n=1&last=docker.io/library/base"));
    assert_eq!(r.json()["repositories"], json!(["local/x"]));
    assert!(r.header("link").unwrap().contains("last=local%2Fx"));
}

#[test]
fn filters_refuse_without_asking_upstream_and_anonymous_pull_can_be_off() {
    if !require(PEERS) {
        return;
    }
    let up = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let mirror = hosted_mirror(&tmp, &up.url(), false);
    let alice = basic("alice", "alice-pw");
    let auth: &[(&str, &str)] = &[("Authorization", &alice)];
    let m = mirror.url();
    let r = http(
        "GET",
        &format!("{m}/v2/docker.io/library/redis/manifests/7"),
        auth,
    );
    assert_eq!((r.status, r.oci_code().as_str()), (403, "DENIED"));
    assert!(r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("deny rule \"library/redis\""));
    let r = http(
        "GET",
        &format!("{m}/v2/docker.io/evil/x/blobs/sha256:{}", "0".repeat(64)),
        auth,
    );
    assert_eq!((r.status, r.oci_code().as_str()), (403, "DENIED"));
    let asked = up.count("GET", "redis")
        + up.count("GET", "evil")
        + up.count("HEAD", "redis")
        + up.count("HEAD", "evil");
    assert_eq!(asked, 0, "upstream never asked");

    // anonymous_pull = false: reads need an htpasswd user.
    let r = get(&format!("{m}/v2/"));
    assert_eq!(
        (r.status, r.header("www-authenticate")),
        (
            401,
            Some(format!("Bearer realm=\"{m}/token\",service=\"entrepot\"").as_str())
        )
    );
    assert_eq!(http("GET", &format!("{m}/v2/"), auth).status, 200);
    let r = get(&format!("{m}/v2/docker.io/library/alpine/manifests/1"));
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
}

/// An upstream repository that only the client's own credentials can read: pulled with
/// them, never served to a caller who has not shown the upstream it may read it.
#[test]
fn private_upstream_images_stay_private() {
    if !require(PEERS) {
        return;
    }
    let private = Registry::start(Auth::Basic("owner", "s3cret"));
    let public = Registry::start(Auth::Anonymous);
    let tmp = TempDir::new().unwrap();
    let layout = Layout::new(tmp.path());
    let digest = layout.build("t", &[("secret.txt", &noise(150_000, 41))]);
    layout.push(
        "t",
        &format!("{}/team/secret:1", private.host()),
        Some("owner:s3cret"),
    );
    let layer = layout.layers(&digest)[0].clone();
    // The mirror has no credentials for priv.io; an (empty) htpasswd makes /v2/ challenge.
    let htpasswd = tmp.path().join("htpasswd");
    std::fs::write(&htpasswd, "").unwrap();
    let mirror = Mirror::start(
        "",
        &format!(
            "[auth]\nhtpasswd = \"{}\"\n[upstreams.\"priv.io\"]\nurl = \"{}\"\n[upstreams.\"docker.io\"]\nurl = \"{}\"\n",
            htpasswd.display(),
            private.url(),
            public.url()
        ),
    );
    let m = mirror.url();
    let owner = basic("owner", "s3cret");

    // containerd with the owner's credentials (sent after our 401 challenge) pulls it.
    let ctr = Containerd::start();
    let hosts = ctr.hosts_dir("h", "priv.io", &m, Style::Ns);
    assert!(
        ctr.pull("anon", &hosts, "priv.io/team/secret:1").is_err(),
        "anonymous pull refused"
    );
    let got = ctr
        .pull_as(
            "owner",
            &hosts,
            "priv.io/team/secret:1",
            Some("owner:s3cret"),
        )
        .expect("owner pulls");
    assert_eq!(got, digest);
    mirror.settle();
    assert_eq!(
        mirror.store_files(&layer[7..]).len(),
        1,
        "the bytes are cached"
    );

    // Anonymous, wrong-password and other-repository requests get nothing, after a
    // re-check that the upstream's own log shows.
    let checks_before = private
        .log()
        .matches(&format!("\"HEAD /v2/team/secret/manifests/{digest}"))
        .count();
    let r = get(&format!("{m}/v2/priv.io/team/secret/manifests/{digest}"));
    assert_eq!((r.status, r.oci_code().as_str()), (401, "UNAUTHORIZED"));
    assert!(
        private
            .log()
            .matches(&format!("\"HEAD /v2/team/secret/manifests/{digest}"))
            .count()
            > checks_before,
        "the mirror re-checked upstream"
    );
    assert_eq!(
        get(&format!("{m}/v2/priv.io/team/secret/blobs/{layer}")).status,
        401
    );
    let wrong = basic("owner", "guess");
    let r = http(
        "GET",
        &format!("{m}/v2/priv.io/team/secret/blobs/{layer}"),
        &[("Authorization", &wrong)],
    );
    assert_eq!(r.status, 401);
    assert_ne!(sha256_hex(&r.body), layer[7..]);
    let r = get(&format!("{m}/v2/priv.io/team/other/blobs/{layer}"));
    assert_eq!(
        r.status, 401,
        "the blob under another private-upstream repo"
    );
    let r = get(&format!("{m}/v2/docker.io/library/x/blobs/{layer}"));
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (404, "BLOB_UNKNOWN"),
        "the blob under a public upstream"
    );

    // The owner, with curl-style Basic credentials, reads it; the proof is then reused.
    let r = http(
        "GET",
        &format!("{m}/v2/priv.io/team/secret/blobs/{layer}"),
        &[("Authorization", &owner)],
    );
    assert_eq!(
        (r.status, sha256_hex(&r.body)),
        (200, layer[7..].to_string())
    );
    let heads = private.count("HEAD", "/v2/team/secret/");
    let r = http(
        "GET",
        &format!("{m}/v2/priv.io/team/secret/manifests/{digest}"),
        &[("Authorization", &owner)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        private.count("HEAD", "/v2/team/secret/"),
        heads,
        "proof cached per credential"
    );
    let cat = get(&format!("{m}/v2/_catalog")).json();
    assert!(
        !cat.to_string().contains("secret"),
        "private repositories are not listed"
    );
}

#[test]
fn abandoned_uploads_are_dropped_with_their_bytes() {
    let tmp = TempDir::new().unwrap();
    if !require(&["htpasswd"]) {
        return;
    }
    let file = htpasswd(tmp.path(), &[("alice", "pw")]);
    let mirror = Mirror::start(
        "",
        &format!(
            "[hosted]\nprefix = \"local\"\nupload_ttl = \"1s\"\n[auth]\nhtpasswd = \"{}\"\npush = [\"alice\"]\n",
            file.display()
        ),
    );
    let alice = basic("alice", "pw");
    let auth: &[(&str, &str)] = &[("Authorization", &alice)];
    let r = http(
        "POST",
        &format!("{}/v2/local/a/blobs/uploads/", mirror.url()),
        auth,
    );
    let loc = format!("{}{}", mirror.url(), r.header("location").unwrap());
    assert_eq!(send(&loc, "PATCH", &noise(10_000, 1), auth).status, 202);
    assert_eq!(
        mirror.tmp_files(),
        2,
        "the upload's bytes and its session record are in temp files"
    );
    wait_until("upload expiry", std::time::Duration::from_secs(10), || {
        mirror.tmp_files() == 0
    });
    let r = send(&loc, "PATCH", b"more", auth);
    assert_eq!(
        (r.status, r.oci_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
}
