# job(), jobs(), crew_events() and the event-driven wait(), against the real daemon.

test_that("job() follows a task through its states", {
  controller <- local_controller(workers = 1L)
  controller$push(argv = c("sleep", "1"), name = "napper")
  seen <- character(0)
  deadline <- Sys.time() + 30
  repeat {
    info <- controller$job("napper")
    if (length(seen) == 0L || seen[[length(seen)]] != info$state) seen <- c(seen, info$state)
    if (identical(info$state, "finished")) break
    expect_true(Sys.time() < deadline)
    Sys.sleep(0.02)
  }
  expect_true("running" %in% seen)
  expect_true(all(seen %in% c("queued", "assigned", "running", "finished")))
  expect_equal(info$name, "napper")
  expect_equal(info$status, "succeeded")
  expect_match(info$slot, "^local-")
  expect_equal(info$output$status, "succeeded")
  expect_false(is.null(info$started))
  # By id too, and received after pop():
  expect_equal(controller$job(info$id)$id, info$id)
  expect_equal(controller$pop()$name, "napper")
  expect_equal(controller$job(info$id)$state, "received")
  err <- tryCatch(controller$job(987654L), crew_api_error = function(e) e)
  expect_equal(err$code, "not_found")
})

test_that("jobs() reads every page of more than 100 jobs", {
  controller <- local_controller(workers = 4L)
  for (i in seq_len(120L)) controller$push(argv = "true", name = paste0("t", i))
  all <- controller$jobs()
  expect_equal(nrow(all), 120L)
  expect_equal(all$id, sort(all$id))
  expect_setequal(all$name, paste0("t", seq_len(120L)))
  expect_true(controller$wait(seconds_timeout = 120))
  # wait() received them into the controller: all received now.
  received <- controller$jobs("received")
  expect_equal(nrow(received), 120L)
  expect_true(all(received$status == "succeeded"))
  expect_equal(nrow(controller$jobs("queued")), 0L)
  expect_error(controller$jobs("sleeping"))
  expect_equal(nrow(controller$collect()), 120L)
})

test_that("crew_events() sees jobs_sent, job_assigned and job_ended of jobs sent after subscribing", {
  controller <- local_controller(workers = 2L)
  socket <- file.path(controller$dir, "crew.sock")
  events <- crew_events(socket, seconds_timeout = 30, after = function() {
    controller$push(argv = c("echo", "hi"), name = "e1")
    controller$push(shell = "exit 2", name = "e2")
  }, until = local({
    ends <- 0L
    function(e) {
      if (identical(e$type, "job_ended")) ends <<- ends + 1L
      ends == 2L
    }
  }))
  types <- vapply(events, function(e) e$type, "")
  expect_true("jobs_sent" %in% types)
  assigned <- Filter(function(e) identical(e$type, "job_assigned"), events)
  ended <- Filter(function(e) identical(e$type, "job_ended"), events)
  expect_length(assigned, 2L)
  expect_length(ended, 2L)
  expect_setequal(vapply(ended, function(e) e$name, ""), c("e1", "e2"))
  expect_setequal(vapply(ended, function(e) e$status, ""), c("succeeded", "failed"))
  expect_lt(match("jobs_sent", types), match("job_assigned", types))
})

test_that("wait() returns promptly after the last task ends, and times out", {
  controller <- local_controller(workers = 2L)
  controller$push(argv = c("sleep", "0.3"), name = "a")
  controller$push(argv = c("sleep", "1"), name = "b")
  start <- Sys.time()
  expect_true(controller$wait(mode = "all", seconds_timeout = 30))
  took <- as.numeric(difftime(Sys.time(), start, units = "secs"))
  expect_gte(took, 0.9)
  expect_lt(took, 3)
  expect_equal(controller$unresolved(), 0L)
  expect_equal(nrow(controller$collect()), 2L)
  controller$push(argv = c("sleep", "30"), name = "long")
  start <- Sys.time()
  expect_false(controller$wait(seconds_timeout = 0.5))
  expect_lt(as.numeric(difftime(Sys.time(), start, units = "secs")), 5)
  controller$push(argv = "true", name = "quick")
  expect_true(controller$wait(mode = "one", seconds_timeout = 30))
  expect_equal(controller$pop()$name, "quick")
  # A window shorter than the wait: subscribed again, nothing missed.
  controller$push(argv = c("sleep", "1.2"), name = "windowed")
  expect_true(controller$wait(mode = "one", seconds_interval = 0.3, seconds_timeout = 30))
  expect_equal(controller$pop()$name, "windowed")
})
