//! A stop signal that blocked threads wake up for: an eventfd polled beside
//! what the thread waits on. The detector and flow threads sleep in the
//! kernel until there is something to read or they are stopped, instead of
//! waking every 100 ms to look at a flag (the agent's idle CPU).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// What a [`StopSignal::wait`] ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The descriptor has something to read (or an error to report).
    Ready,
    Stopped,
    TimedOut,
}

#[derive(Debug)]
pub struct StopSignal {
    stopped: AtomicBool,
    event: OwnedFd,
}

impl StopSignal {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2); ownership taken right away.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(StopSignal {
            stopped: AtomicBool::new(false),
            // SAFETY: fd is a fresh descriptor owned by nobody else.
            event: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Stops every waiter, now and later.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a valid buffer to our eventfd. It can
        // only fail when the counter would overflow: it is signalled then.
        unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    /// Sleeps for `timeout` unless stopped first; returns whether stopped.
    pub fn sleep(&self, timeout: Duration) -> io::Result<bool> {
        Ok(self.wait(&self.event, Some(timeout))? == Wait::Stopped)
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Waits until `fd` is readable, the signal is given, or `timeout`
    /// (None: no limit) passes.
    pub fn wait(&self, fd: impl AsFd, timeout: Option<Duration>) -> io::Result<Wait> {
        if self.is_stopped() {
            return Ok(Wait::Stopped);
        }
        let mut fds = [
            libc::pollfd {
                fd: fd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(Wait::TimedOut)
            } else {
                Err(e)
            };
        }
        Ok(if fds[1].revents != 0 || self.is_stopped() {
            Wait::Stopped
        } else if fds[0].revents != 0 {
            Wait::Ready
        } else {
            Wait::TimedOut
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::net::UnixDatagram, sync::Arc};

    use super::*;

    #[test]
    fn a_waiter_wakes_for_data_for_the_stop_and_at_its_timeout() {
        let (a, b) = UnixDatagram::pair().unwrap();
        let signal = Arc::new(StopSignal::new().unwrap());
        assert_eq!(
            signal.wait(&b, Some(Duration::from_millis(20))).unwrap(),
            Wait::TimedOut
        );
        a.send(b"x").unwrap();
        assert_eq!(signal.wait(&b, None).unwrap(), Wait::Ready);
        let mut buf = [0u8; 4];
        b.recv(&mut buf).unwrap();
        let waiter = {
            let signal = signal.clone();
            std::thread::spawn(move || signal.wait(&b, None).unwrap())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "woke without data or a stop");
        signal.stop();
        assert_eq!(waiter.join().unwrap(), Wait::Stopped);
        assert!(signal.is_stopped());
    }
}
