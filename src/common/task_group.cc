#include "common/task_group.h"

#include <algorithm>

namespace lazyblock {

// Threads are joined, not detached: a thread's exit runs libraries'
// thread-local destructors (OpenSSL's among them), which must be over before
// the owner, or the process, tears those libraries down.
void TaskGroup::spawn(std::function<void()> task) {
  auto done = std::make_shared<std::atomic<bool>>(false);
  std::thread thread([task = std::move(task), done]() mutable {
    task();
    task = nullptr;  // drop what the task holds before saying it is done
    done->store(true, std::memory_order_release);
  });
  std::vector<Worker> finished;
  {
    MutexLock lock(mu_);
    // Reap the threads whose tasks are over, so that they do not pile up.
    auto over = std::partition(workers_.begin(), workers_.end(), [](const Worker& w) {
      return !w.done->load(std::memory_order_acquire);
    });
    std::move(over, workers_.end(), std::back_inserter(finished));
    workers_.erase(over, workers_.end());
    workers_.push_back({std::move(thread), std::move(done)});
  }
  for (Worker& worker : finished) worker.thread.join();  // each is exiting already
}

void TaskGroup::wait() {
  for (;;) {
    std::vector<Worker> workers;
    {
      MutexLock lock(mu_);
      workers.swap(workers_);
    }
    if (workers.empty()) return;
    // Tasks may start more tasks while we join: look again after.
    for (Worker& worker : workers) worker.thread.join();
  }
}

}  // namespace lazyblock
