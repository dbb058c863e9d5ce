// A small thread pool whose workers sleep on a condition variable between jobs (never spin: the
// machines exo runs on are often oversubscribed). The caller runs tasks too; it waits only for the
// tasks, not for late workers to wake, so a job costs no wake-up latency when the caller is enough.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace exo_kernels {

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { work(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int threads() const { return (int)workers_.size() + 1; }

  // Runs f(0) ... f(tasks - 1), each once, on the caller and the workers; returns when all are done.
  // A second caller while a job runs (another MLX stream's thread) runs its tasks itself.
  void run(int tasks, const std::function<void(int)>& f) {
    if (tasks <= 0) return;
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (tasks == 1 || workers_.empty() || !busy.owns_lock()) {
      for (int i = 0; i < tasks; i++) f(i);
      return;
    }
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen = ++gen_;
      job_ = &f;
      tasks_ = tasks;
      done_ = 0;
      next_.store((uint64_t)gen << 32);
    }
    wake_.notify_all();
    drain(gen, f, tasks);
    std::unique_lock<std::mutex> lk(mu_);
    finished_.wait(lk, [&] { return done_ == tasks_; });
    job_ = nullptr;
  }

 private:
  // Claims task indices of generation `gen` until none is left.
  void drain(uint32_t gen, const std::function<void(int)>& f, int tasks) {
    for (;;) {
      uint64_t v = next_.load();
      int i;
      do {
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= tasks) return;
        i = (int)(uint32_t)v;
      } while (!next_.compare_exchange_weak(v, v + 1));
      f(i);
      std::lock_guard<std::mutex> lk(mu_);
      if (++done_ == tasks_) finished_.notify_one();
    }
  }

  void work() {
    uint32_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      int tasks;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return stop_ || (gen_ != seen && job_ != nullptr); });
        if (stop_) return;
        seen = gen_;
        job = job_;
        tasks = tasks_;
      }
      drain(seen, *job, tasks);  // the caller keeps *job alive until every task of `seen` is done
    }
  }

  std::mutex mu_, run_mu_;
  std::condition_variable wake_, finished_;
  const std::function<void(int)>* job_ = nullptr;
  uint32_t gen_ = 0;
  int tasks_ = 0, done_ = 0;
  bool stop_ = false;
  std::atomic<uint64_t> next_{0};
  std::vector<std::thread> workers_;
};

}  // namespace exo_kernels
