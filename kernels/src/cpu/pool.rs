//! Small persistent worker pools for the CPU kernels, one per [`Lane`].
//!
//! Why not `std::thread::scope` or rayon: a decode step issues ~200 matmuls of
//! a few microseconds each; spawning threads per call costs more than the
//! work, and rayon's idle workers spin and yield in ways that fight the
//! caller for the only other core (seen in candle's profile).
//!
//! Lanes: each subsystem that runs forward passes concurrently with another
//! (the generation engine, the sentence embedder) has its own pool with its
//! own workers, chosen by the calling thread's lane ([`set_thread_lane`]).
//! With one pool, a second concurrent caller found it busy and ran every task
//! on its own thread, so a decode step beside an ingest ran single-threaded.
//!
//! Design of one pool: the calling thread is one of the `threads` participants
//! and claims tasks itself, so a job never waits for a worker to wake up — a
//! sleeping or descheduled worker just means the caller does more of the
//! tasks. Tasks are claimed with a CAS on `claim = (generation << 32) | next`;
//! a late worker holding a stale job pointer fails that CAS (generation
//! mismatch or no task left) before it could call the job, and a claimed task
//! keeps the caller waiting (`done < n`), so the borrowed job outlives every
//! call to it. Workers spin briefly on the generation counter (consecutive
//! matmuls of a forward pass come microseconds apart), then park on a condvar.
//! One job at a time per pool: a concurrent caller on the same lane that finds
//! the pool busy runs its tasks on its own thread. A panicking task is caught,
//! the job still completes, and the panic is re-raised in the caller.
//!
//! Tested by the kernel tests (bit-identical results for 1..8 threads and
//! for concurrent callers) and by the unit tests below (two pools serve two
//! callers at once, each with its own workers; a lane picks its pool).

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// How long an idle worker polls for the next job before parking.
const SPIN: Duration = Duration::from_micros(200);
/// Upper bound on worker threads per pool (a pool never shrinks).
const MAX_WORKERS: usize = 255;

/// Which pool a thread's kernel calls run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    /// The generation engine (and any thread that never chose a lane).
    #[default]
    Default,
    /// The sentence embedder's worker thread.
    Embed,
}

static POOLS: [Pool; 2] = [Pool::new("qmatmul"), Pool::new("qmatmul-embed")];

thread_local! {
    static LANE: Cell<Lane> = const { Cell::new(Lane::Default) };
}

/// Routes the calling thread's kernel calls to `lane`'s pool from now on.
/// Called once at the start of a subsystem's worker thread.
pub fn set_thread_lane(lane: Lane) {
    LANE.set(lane);
}

#[derive(Clone, Copy)]
struct JobRef(*const Task<'static>);
// SAFETY: the pointee is `Sync`; the claim protocol bounds its use to its lifetime.
unsafe impl Send for JobRef {}

struct Slot {
    generation: u32,
    job: Option<JobRef>,
    n_tasks: usize,
    workers: usize,
    sleepers: usize,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    epoch: AtomicU32,
    claim: AtomicU64,
    done: AtomicUsize,
    panicked: AtomicBool,
}

/// One pool: its shared job slot and the caller lock that also counts its workers.
struct Pool {
    /// Worker thread names are `{name}-{i}`.
    name: &'static str,
    shared: Shared,
    /// Held by the one caller whose job is in flight; counts the spawned workers.
    caller: Mutex<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while these locks are held; recover the data regardless.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `task(i)` for every `i < n_tasks` on up to `threads` threads (the
/// caller included) of the calling thread's lane, and returns when all have finished.
pub(crate) fn run(threads: usize, n_tasks: usize, task: &Task<'_>) {
    let pool = match LANE.get() {
        Lane::Default => &POOLS[0],
        Lane::Embed => &POOLS[1],
    };
    pool.run(threads, n_tasks, task)
}

impl Pool {
    const fn new(name: &'static str) -> Self {
        Self {
            name,
            shared: Shared {
                slot: Mutex::new(Slot {
                    generation: 0,
                    job: None,
                    n_tasks: 0,
                    workers: 0,
                    sleepers: 0,
                }),
                wake: Condvar::new(),
                epoch: AtomicU32::new(0),
                claim: AtomicU64::new(0),
                done: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
            },
            caller: Mutex::new(0),
        }
    }

    fn run(&'static self, threads: usize, n_tasks: usize, task: &Task<'_>) {
        if threads <= 1 || n_tasks <= 1 {
            (0..n_tasks).for_each(task);
            return;
        }
        let mut spawned = match self.caller.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..n_tasks).for_each(task);
                return;
            }
        };
        let sh = &self.shared;
        let want = (threads - 1).min(MAX_WORKERS);
        // The epoch before this job's: a new worker joins this job, however late it starts.
        let seen = sh.epoch.load(Ordering::Acquire);
        while *spawned < want {
            let id = *spawned;
            let started = std::thread::Builder::new()
                .name(format!("{}-{id}", self.name))
                .spawn(move || worker(sh, id, seen));
            if started.is_err() {
                break; // run with the workers we have
            }
            *spawned += 1;
        }
        // SAFETY (lifetime erasure): see the module doc; `run` returns only after
        // `done == n_tasks`, and no worker calls the job without a successful claim.
        let job = JobRef(unsafe { std::mem::transmute::<*const Task<'_>, *const Task<'static>>(task) });
        let generation = {
            let mut slot = lock(&sh.slot);
            slot.generation = slot.generation.wrapping_add(1);
            slot.job = Some(job);
            slot.n_tasks = n_tasks;
            slot.workers = want.min(*spawned);
            sh.done.store(0, Ordering::Relaxed);
            sh.claim.store(u64::from(slot.generation) << 32, Ordering::Release);
            sh.epoch.store(slot.generation, Ordering::Release);
            if slot.sleepers > 0 {
                sh.wake.notify_all();
            }
            slot.generation
        };
        work(sh, generation, n_tasks, job);
        let mut polls = 0u32;
        while sh.done.load(Ordering::Acquire) < n_tasks {
            polls += 1;
            if polls < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        drop(spawned);
        if sh.panicked.swap(false, Ordering::AcqRel) {
            panic!("a qmatmul task panicked");
        }
    }
}

/// Claims and runs tasks of job `generation` until none is left.
fn work(sh: &Shared, generation: u32, n_tasks: usize, job: JobRef) {
    let mut cur = sh.claim.load(Ordering::Acquire);
    loop {
        if (cur >> 32) as u32 != generation || (cur as u32 as usize) >= n_tasks {
            return;
        }
        match sh
            .claim
            .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // SAFETY: a claimed task of the current generation keeps the caller in `run`.
                let task = unsafe { &*job.0 };
                if catch_unwind(AssertUnwindSafe(|| task(cur as u32 as usize))).is_err() {
                    sh.panicked.store(true, Ordering::Release);
                }
                sh.done.fetch_add(1, Ordering::AcqRel);
                cur = sh.claim.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

fn worker(sh: &'static Shared, id: usize, mut seen: u32) {
    loop {
        let start = Instant::now();
        let mut polls = 0u32;
        let mut fresh = false;
        while !fresh {
            fresh = sh.epoch.load(Ordering::Acquire) != seen;
            polls = polls.wrapping_add(1);
            if polls.is_multiple_of(128) && start.elapsed() > SPIN {
                break;
            }
            std::hint::spin_loop();
        }
        let mut slot = lock(&sh.slot);
        while slot.generation == seen {
            slot.sleepers += 1;
            slot = sh.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
            slot.sleepers -= 1;
        }
        let (generation, job, n_tasks, workers) = (slot.generation, slot.job, slot.n_tasks, slot.workers);
        drop(slot);
        seen = generation;
        if let (Some(job), true) = (job, id < workers) {
            work(sh, generation, n_tasks, job);
        }
    }
}

/// Output pointer shared by a job's tasks; each writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements (distinct groups) and the owner waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// # Safety
    /// `i` is inside the output slice and owned by the calling task.
    pub(crate) unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }

    /// # Safety
    /// As for [`OutPtr::at`].
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        self.0.add(i).write(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 3, 5] {
            for n in [0, 1, 2, 7, 64, 1000] {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                run(threads, n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads} n {n}"
                );
            }
        }
    }

    #[test]
    fn concurrent_callers_and_parked_workers() {
        std::thread::scope(|s| {
            for k in 0..4 {
                s.spawn(move || {
                    for round in 0..50 {
                        if round % 10 == 0 {
                            std::thread::sleep(SPIN * 3); // let workers park
                        }
                        let sum = AtomicUsize::new(0);
                        run(2 + k % 2, 33, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(sum.load(Ordering::Relaxed), 33 * 32 / 2);
                    }
                });
            }
        });
    }

    #[test]
    fn task_panic_is_reraised_and_the_pool_survives() {
        // Either path may run it (another test may hold the pool): the pool
        // path completes the job before re-raising, the inline path unwinds.
        let result = catch_unwind(AssertUnwindSafe(|| run(2, 16, &|i| assert!(i != 5, "boom"))));
        assert!(result.is_err());
        let again = AtomicUsize::new(0);
        run(2, 16, &|_| {
            again.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(again.load(Ordering::Relaxed), 16);
    }

    /// Counts itself in `started`, then waits (up to 10 s) until `want` tasks have started:
    /// tasks that all get past it ran at the same time, on distinct threads.
    fn meet(started: &AtomicUsize, want: usize) -> bool {
        started.fetch_add(1, Ordering::AcqRel);
        let t0 = Instant::now();
        while started.load(Ordering::Acquire) < want {
            if t0.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    /// The threads that ran a job's tasks, sorted.
    fn names(ran: &Mutex<Vec<String>>) -> Vec<String> {
        let mut v = lock(ran).clone();
        v.sort();
        v
    }

    fn record(ran: &Mutex<Vec<String>>) {
        lock(ran).push(std::thread::current().name().unwrap_or("?").to_string());
    }

    #[test]
    fn two_pools_serve_two_callers_at_once_each_with_its_own_workers() {
        // Fresh pools: the lanes' pools are shared with the other tests of this binary.
        let pools: [&'static Pool; 2] = [
            Box::leak(Box::new(Pool::new("test-a"))),
            Box::leak(Box::new(Pool::new("test-b"))),
        ];
        // Every task of both jobs must be running at once: 2 callers + 1 worker per pool.
        let all = AtomicUsize::new(0);
        let ran = [Mutex::new(Vec::new()), Mutex::new(Vec::new())];
        let met = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for (i, pool) in pools.into_iter().enumerate() {
                let (all, ran, met) = (&all, &ran[i], &met);
                std::thread::Builder::new()
                    .name(format!("caller-{i}"))
                    .spawn_scoped(s, move || {
                        pool.run(2, 2, &|_| {
                            record(ran);
                            if meet(all, 4) {
                                met.fetch_add(1, Ordering::Relaxed);
                            }
                        })
                    })
                    .unwrap();
            }
        });
        assert_eq!(met.load(Ordering::Relaxed), 4, "the two jobs did not run side by side");
        assert_eq!(names(&ran[0]), ["caller-0", "test-a-0"]);
        assert_eq!(names(&ran[1]), ["caller-1", "test-b-0"]);
    }

    #[test]
    fn a_threads_lane_picks_its_pool() {
        let started = AtomicUsize::new(0);
        let ran = Mutex::new(Vec::new());
        let met = AtomicUsize::new(0);
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("embedder".into())
                .spawn_scoped(s, || {
                    set_thread_lane(Lane::Embed);
                    run(2, 2, &|_| {
                        record(&ran);
                        if meet(&started, 2) {
                            met.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .unwrap();
        });
        assert_eq!(
            met.load(Ordering::Relaxed),
            2,
            "the embed lane's worker did not take a task"
        );
        assert_eq!(names(&ran), ["embedder", "qmatmul-embed-0"]);
    }
}
