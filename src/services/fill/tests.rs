//! The blob fill without any process: an in-memory source (a channel of chunks the test
//! feeds) into a store in a temp dir, followed by readers as requests follow it. Each
//! test runs in milliseconds, without root.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::Digest as _;
use tokio::sync::mpsc;

use super::state::Fill;
use super::stream::{Avail, BodyStream, OpenRelay, Relay};
use crate::metrics::Metrics;
use crate::names::Digest;
use crate::services::fill;
use crate::services::flight::{Join, Lead};
use crate::services::{Mirror, ServiceError, Services};
use crate::store::Store;
use crate::upstream::{ClientShared, Upstream, UpstreamClient};

/// A mirror on a temp dir.
struct Bench {
    svc: Services,
    _dir: tempfile::TempDir,
}

/// The upstream the fills are for (never asked: the test is the source).
fn upstream() -> Upstream {
    Upstream {
        tag_ttl: Duration::from_secs(60),
        ..Upstream::for_tests("hub", "http://127.0.0.1:9")
    }
}

fn bench() -> Bench {
    let dir = tempfile::TempDir::new().expect("temp dir");
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).expect("metrics"));
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let mirror = Arc::new(Mirror::new(store, metrics.clone(), None));
    let client = UpstreamClient::new(&ClientShared::new(metrics), Duration::from_secs(5), &[]);
    Bench {
        svc: Services::new(mirror, client),
        _dir: dir,
    }
}

fn noise(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

fn digest_of(bytes: &[u8]) -> Digest {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
        .parse()
        .expect("digest")
}

/// The source: chunks the test sends, ending when the sender is dropped.
type Feed = mpsc::UnboundedSender<Result<Bytes, String>>;

fn source() -> (
    Feed,
    impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .boxed_local();
    (tx, body)
}

impl Bench {
    /// Leads the fill of `d` from the source, as `Services::fill` does once the upstream
    /// answered: write (pump), then verify, commit and link; a failure ends every reader.
    fn lead(&self, d: &Digest, size: Option<u64>) -> (Feed, tokio::sync::watch::Receiver<Fill>) {
        let Join::Leader(lead) = self
            .svc
            .mirror
            .blob_flights
            .join(*d, || Fill::for_origin("hub/lib/app".into()))
        else {
            panic!("a fill already runs for {d}");
        };
        let rx = lead.subscribe();
        let (feed, body) = source();
        let (svc, d) = (self.svc.clone(), *d);
        actix_web::rt::spawn(async move { run(svc, lead, upstream(), d, body, size).await });
        (feed, rx)
    }

    /// A request following the fill, running from now on: waits for the fill to start,
    /// then streams all of it (or how many bytes it got before its error).
    fn read(
        &self,
        rx: tokio::sync::watch::Receiver<Fill>,
    ) -> tokio::task::JoinHandle<Result<Vec<u8>, (usize, String)>> {
        self.read_relaying(rx, None)
    }

    /// [`Self::read`], relaying from `origin` (as from the upstream) if the fill stops
    /// caching.
    fn read_relaying(
        &self,
        rx: tokio::sync::watch::Receiver<Fill>,
        origin: Option<Arc<Vec<u8>>>,
    ) -> tokio::task::JoinHandle<Result<Vec<u8>, (usize, String)>> {
        let metrics = self.svc.mirror.metrics.clone();
        let relay = origin.map(|blob| -> OpenRelay {
            Box::new(move |pos| {
                let rest = Bytes::copy_from_slice(&blob[pos as usize..]);
                let chunks: Vec<_> = rest.chunks(7_777).map(Bytes::copy_from_slice).collect();
                let relay: Relay =
                    futures_util::stream::iter(chunks.into_iter().map(Ok)).boxed_local();
                Box::pin(async move { Ok(relay) })
            })
        });
        actix_web::rt::spawn(async move {
            let mut rx = rx;
            let (file, size) = super::state::wait_started(&mut rx)
                .await
                .map_err(|e| (0, e.to_string()))?;
            let end = size.unwrap_or(u64::MAX);
            let mut body =
                BodyStream::new(file, 0, end, Avail::Fill(rx, relay), metrics, "upstream");
            let mut got = Vec::new();
            while let Some(chunk) = body.next().await {
                got.extend_from_slice(&chunk.map_err(|e| (got.len(), e.to_string()))?);
            }
            Ok(got)
        })
    }

    /// Waits (bounded) for the fill to end: the size stored, if it committed.
    async fn stored(&self, mut rx: tokio::sync::watch::Receiver<Fill>, d: &Digest) -> Option<u64> {
        let ended = rx.wait_for(|f| f.ended());
        let _ = tokio::time::timeout(Duration::from_secs(10), ended).await;
        self.svc.store().local_size(d).expect("store")
    }
}

async fn run(
    svc: Services,
    lead: Lead<Digest, Fill>,
    up: Upstream,
    d: Digest,
    body: impl futures_util::Stream<Item = Result<Bytes, String>> + Unpin,
    size: Option<u64>,
) {
    let r: Result<(), ServiceError> = async {
        let Some(w) = fill::write_fill(&svc, &lead, &d, body, size, Some(&up)).await? else {
            return Ok(());
        };
        fill::finish_fill(&svc, &lead, &up, "lib/app", &d, w, size, false).await
    }
    .await;
    if let Err(e) = r {
        lead.tx.send_modify(|f| f.fail(Arc::new(e)));
    }
}

/// Sends `blob` in chunks of the given sizes, cycling.
fn send_in(feed: &Feed, blob: &[u8], sizes: &[usize]) {
    let mut at = 0;
    for n in sizes.iter().cycle() {
        if at >= blob.len() {
            break;
        }
        let end = (at + n).min(blob.len());
        let _ = feed.send(Ok(Bytes::copy_from_slice(&blob[at..end])));
        at = end;
    }
}

/// Waits (bounded) until the fill has written `n` bytes to its file.
async fn written(rx: &mut tokio::sync::watch::Receiver<Fill>, n: u64) {
    let wait = rx.wait_for(|f| f.written >= n || f.ended());
    let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
}

#[actix_web::test]
async fn bytes_in_odd_chunks_reach_every_reader_whole() {
    let b = bench();
    let blob = noise(300_001, 1);
    let d = digest_of(&blob);
    let (feed, rx) = b.lead(&d, Some(blob.len() as u64));
    let readers = [b.read(rx.clone()), b.read(rx.clone())];
    send_in(&feed, &blob, &[1, 7, 4093, 65_537, 3, 100_000]);
    drop(feed);
    for got in futures_util::future::join_all(readers).await {
        assert_eq!(got.expect("reader").map(|g| digest_of(&g)), Ok(d));
    }
    assert_eq!(b.stored(rx, &d).await, Some(blob.len() as u64));
}

#[actix_web::test]
async fn a_wrong_digest_never_gives_a_reader_the_last_byte() {
    let b = bench();
    let blob = noise(200_000, 2);
    let mut bad = blob.clone();
    bad[150_000] ^= 0xff;
    let d = digest_of(&blob);
    let (feed, rx) = b.lead(&d, Some(blob.len() as u64));
    let reader = b.read(rx.clone());
    send_in(&feed, &bad, &[8192]);
    drop(feed);
    let got = reader.await.expect("reader");
    let (sent, _) = got.expect_err("the reader ends with an error");
    assert!(sent < blob.len(), "the last byte never left: {sent}");
    assert_eq!(b.stored(rx.clone(), &d).await, None, "nothing stored");
    assert!(rx.borrow().error().is_some(), "the fill failed");
}

#[actix_web::test]
async fn a_source_that_breaks_mid_way_fails_its_readers_and_stores_nothing() {
    let b = bench();
    let blob = noise(100_000, 3);
    let d = digest_of(&blob);
    let (feed, rx) = b.lead(&d, Some(blob.len() as u64));
    let reader = b.read(rx.clone());
    send_in(&feed, &blob[..40_000], &[10_000]);
    let _ = feed.send(Err("connection reset by the upstream".into()));
    let got = reader.await.expect("reader");
    assert!(
        got.as_ref()
            .is_err_and(|(n, e)| *n <= 40_000 && e.contains("connection reset")),
        "{got:?}"
    );
    assert_eq!(b.stored(rx, &d).await, None);
}

/// Past the 16 MiB the fill keeps in memory, a reader that joins late reads the start
/// from the file and then follows the fill.
#[actix_web::test]
async fn a_late_reader_catches_up_from_the_file() {
    let b = bench();
    let blob = noise(20 << 20, 4);
    let d = digest_of(&blob);
    let (feed, mut rx) = b.lead(&d, Some(blob.len() as u64));
    let early = b.read(rx.clone());
    send_in(&feed, &blob[..18 << 20], &[1 << 20]);
    written(&mut rx, 17 << 20).await;
    assert!(rx.borrow().written >= 17 << 20, "the start is in the file");
    let late = b.read(rx.clone());
    send_in(&feed, &blob[18 << 20..], &[1 << 20]);
    drop(feed);
    let (early, late) = futures_util::join!(early, late);
    assert_eq!(early.expect("early").map(|g| digest_of(&g)), Ok(d));
    assert_eq!(late.expect("late").map(|g| digest_of(&g)), Ok(d));
    assert_eq!(b.stored(rx, &d).await, Some(blob.len() as u64));
}

#[actix_web::test]
async fn the_leaders_client_leaving_does_not_stop_the_fill() {
    let b = bench();
    let blob = noise(400_000, 5);
    let d = digest_of(&blob);
    let (feed, mut rx) = b.lead(&d, Some(blob.len() as u64));
    // The first client reads a little and goes away.
    let (file, size) = super::state::wait_started(&mut rx.clone())
        .await
        .map(|(f, s)| (f, s.unwrap_or(0)))
        .unwrap_or((None, 0));
    send_in(&feed, &blob[..100_000], &[16_384]);
    {
        let metrics = b.svc.mirror.metrics.clone();
        let mut first = BodyStream::new(
            file,
            0,
            size,
            Avail::Fill(rx.clone(), None),
            metrics,
            "upstream",
        );
        let chunk = first.next().await;
        assert!(chunk.is_some_and(|c| c.is_ok()));
    }
    let other = b.read(rx.clone());
    send_in(&feed, &blob[100_000..], &[16_384]);
    drop(feed);
    assert_eq!(other.await.expect("reader").map(|g| digest_of(&g)), Ok(d));
    assert_eq!(b.stored(rx.clone(), &d).await, Some(blob.len() as u64));
    assert!(rx.borrow_and_update().committed());
}

/// Size unknown (no Content-Length): every byte but the last reaches the reader while the
/// source is open; the last one only once the source ended and the digest matched.
#[actix_web::test]
async fn a_blob_of_unknown_size_is_held_back_until_verified() {
    let b = bench();
    let blob = noise(70_000, 6);
    let d = digest_of(&blob);
    let (feed, mut rx) = b.lead(&d, None);
    send_in(&feed, &blob, &[9_999]);
    let (file, _) = super::state::wait_started(&mut rx).await.expect("started");
    let metrics = b.svc.mirror.metrics.clone();
    let mut body = BodyStream::new(
        file,
        0,
        u64::MAX,
        Avail::Fill(rx.clone(), None),
        metrics,
        "upstream",
    );
    let mut got = Vec::new();
    while let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_millis(300), body.next()).await
    {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(
        got.len(),
        blob.len() - 1,
        "all but the last byte while the source is open"
    );
    drop(feed);
    while let Some(chunk) = body.next().await {
        got.extend_from_slice(&chunk.expect("chunk"));
    }
    assert_eq!(digest_of(&got), d);
    assert_eq!(b.stored(rx, &d).await, Some(blob.len() as u64));
}

/// The disk fills up a third of the way: nothing is stored, no partial file stays, the
/// refusal is counted, and every reader still gets the whole blob, the first part from
/// the file and the rest relayed from the source.
#[actix_web::test]
async fn a_full_disk_stores_nothing_and_readers_relay_the_rest() {
    let b = bench();
    b.svc.store().limit_room(1 << 20);
    let blob = Arc::new(noise(3 << 20, 7));
    let d = digest_of(&blob);
    let (feed, rx) = b.lead(&d, Some(blob.len() as u64));
    let readers = [
        b.read_relaying(rx.clone(), Some(blob.clone())),
        b.read_relaying(rx.clone(), Some(blob.clone())),
    ];
    send_in(&feed, &blob, &[65_536]);
    drop(feed);
    for got in futures_util::future::join_all(readers).await {
        assert_eq!(got.expect("reader").map(|g| digest_of(&g)), Ok(d));
    }
    assert_eq!(b.stored(rx.clone(), &d).await, None, "nothing stored");
    assert!(rx.borrow().passthrough(), "the fill gave up caching");
    let refused = b
        .svc
        .metrics()
        .store_errors
        .with_label_values(&["no_space"]);
    assert_eq!(refused.get(), 1);
    let tmp = std::fs::read_dir(b.svc.store().root().join("tmp")).expect("tmp dir");
    assert_eq!(tmp.count(), 0, "the partial file is removed");
}
