#include "common/task_group.h"

#include <thread>

namespace lazyblock {

void TaskGroup::spawn(std::function<void()> task) {
  {
    std::lock_guard lock(mu_);
    ++running_;
  }
  std::thread([this, task = std::move(task)]() mutable {
    task();
    // Drop what the task holds before the group may go away.
    task = nullptr;
    // Notify while holding the lock: once it is released, wait() may return
    // and the group be destroyed, so nothing of it may be touched after.
    std::lock_guard lock(mu_);
    if (--running_ == 0) idle_.notify_all();
  }).detach();
}

void TaskGroup::wait() {
  std::unique_lock lock(mu_);
  idle_.wait(lock, [this] { return running_ == 0; });
}

}  // namespace lazyblock
