//! An object store wrapper that injects transient faults, for fault tests: chosen calls
//! (`fail_nth_*`) or, with a [`FaultPlan`], a random share of them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::faults::{FaultPlan, count_injected};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Fail without touching the inner store.
    Before,
    /// Perform the operation, then report failure (an ambiguous outcome, as a lost response).
    After,
}

/// Wraps an [`ObjectStore`] and fails chosen puts and gets with a transient
/// (`object_store::Error::Generic`) error. Puts are `put_opts` calls; gets are `get_opts` calls,
/// which include `HEAD`s. Ordinals count calls made after the fault is armed, from 1.
#[derive(Debug)]
pub struct UnreliableStore {
    inner: Arc<dyn ObjectStore>,
    puts: AtomicU64,
    gets: AtomicU64,
    put_faults: Mutex<BTreeMap<u64, Fault>>,
    get_faults: Mutex<BTreeMap<u64, Fault>>,
    random: Option<(FaultPlan, Mutex<StdRng>)>,
}

impl UnreliableStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        UnreliableStore {
            inner,
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            put_faults: Mutex::new(BTreeMap::new()),
            get_faults: Mutex::new(BTreeMap::new()),
            random: None,
        }
    }

    /// Fails and delays calls at random as `plan` says (armed faults still fire first).
    pub fn with_plan(inner: Arc<dyn ObjectStore>, plan: FaultPlan) -> Self {
        let rng = Mutex::new(StdRng::seed_from_u64(plan.seed));
        UnreliableStore {
            random: Some((plan, rng)),
            ..Self::new(inner)
        }
    }

    /// What the random plan does to the next put: a fault, or how long to wait first.
    fn roll_put(&self) -> (Option<Fault>, std::time::Duration) {
        let Some((plan, rng)) = &self.random else {
            return (None, std::time::Duration::ZERO);
        };
        let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
        if rng.random_range(0..100u8) < plan.write_fail_percent {
            count_injected();
            let f = if rng.random_bool(0.5) {
                Fault::Before
            } else {
                Fault::After
            };
            return (Some(f), std::time::Duration::ZERO);
        }
        (None, plan.max_delay.mul_f64(rng.random::<f64>()))
    }

    fn roll_get(&self) -> Option<Fault> {
        let (plan, rng) = self.random.as_ref()?;
        let mut rng = rng.lock().unwrap_or_else(|p| p.into_inner());
        (rng.random_range(0..100u8) < plan.read_fail_percent).then(|| {
            count_injected();
            Fault::Before
        })
    }

    /// The `n`-th put from now (1 = the next one) fails without writing.
    pub fn fail_nth_put(&self, n: u64) {
        arm(&self.put_faults, &self.puts, n, Fault::Before);
    }

    /// The `n`-th put from now writes the object and then reports a transient failure.
    pub fn fail_nth_put_after_write(&self, n: u64) {
        arm(&self.put_faults, &self.puts, n, Fault::After);
    }

    /// The `n`-th get (or head) from now fails.
    pub fn fail_nth_get(&self, n: u64) {
        arm(&self.get_faults, &self.gets, n, Fault::Before);
    }

    /// Puts seen so far (including failed ones).
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::SeqCst)
    }

    /// Gets and heads seen so far (including failed ones).
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::SeqCst)
    }

    /// Faults armed but not fired yet.
    pub fn pending_faults(&self) -> usize {
        lock(&self.put_faults).len() + lock(&self.get_faults).len()
    }
}

fn lock(m: &Mutex<BTreeMap<u64, Fault>>) -> std::sync::MutexGuard<'_, BTreeMap<u64, Fault>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn arm(faults: &Mutex<BTreeMap<u64, Fault>>, counter: &AtomicU64, n: u64, f: Fault) {
    let at = counter.load(Ordering::SeqCst) + n.max(1);
    lock(faults).insert(at, f);
}

fn next(faults: &Mutex<BTreeMap<u64, Fault>>, counter: &AtomicU64) -> Option<Fault> {
    let ordinal = counter.fetch_add(1, Ordering::SeqCst) + 1;
    lock(faults).remove(&ordinal)
}

fn injected(op: &str, location: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "unreliable",
        source: format!("injected transient fault on {op} {location}").into(),
    }
}

impl fmt::Display for UnreliableStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unreliable({})", self.inner)?;
        if let Some((plan, _)) = &self.random {
            write!(f, " {plan:?}")?;
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for UnreliableStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let (random, delay) = self.roll_put();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match next(&self.put_faults, &self.puts).or(random) {
            Some(Fault::Before) => Err(injected("put", location)),
            Some(Fault::After) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(injected("put", location))
            }
            None => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        match next(&self.get_faults, &self.gets).or_else(|| self.roll_get()) {
            Some(_) => Err(injected("get", location)),
            None => self.inner.get_opts(location, options).await,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
