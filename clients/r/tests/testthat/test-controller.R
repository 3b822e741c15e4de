test_that("100 shell jobs: push, wait, collect", {
  controller <- local_controller()
  expect_true(controller$empty())
  expect_null(controller$pop())
  for (i in seq_len(100L)) {
    controller$push(argv = c("echo", i), name = paste0("job-", i))
  }
  expect_false(controller$empty())
  expect_true(controller$wait(mode = "all", seconds_timeout = 120))
  results <- controller$collect()
  expect_equal(nrow(results), 100L)
  expect_setequal(results$name, paste0("job-", seq_len(100L)))
  expect_equal(unlist(results$result)[order(results$id)], paste0(seq_len(100L), "\n"))
  expect_true(all(results$status == "success"))
  expect_true(all(results$code == 0L))
  expect_true(all(results$controller == "crew"))
  expect_true(all(grepl("^local-", results$worker)))
  expect_true(controller$empty())
  expect_null(controller$collect())
})

test_that("R expressions run on workers with their data, packages and seed", {
  controller <- local_controller(workers = 2L)
  controller$push(command = x + y, data = list(x = 1, y = 2), name = "sum")
  controller$push(command = quote(sqrt(z)), data = list(z = 16), name = "quoted")
  controller$push(command = runif(1), seed = 7L, name = "seeded")
  expect_true(controller$wait(seconds_timeout = 60))
  results <- controller$collect()
  results <- results[order(results$name), ]
  expect_equal(results$name, c("quoted", "seeded", "sum"))
  expect_equal(results$result[[1]], 4)
  set.seed(7L)
  expect_equal(results$result[[2]], runif(1))
  expect_equal(results$result[[3]], 3)
  expect_equal(results$seed[[2]], 7L)
  expect_true(all(results$status == "success"))
  expect_true(all(is.na(results$error)))
})

test_that("an R error comes back as an error result, and pop(error = 'stop') signals it", {
  controller <- local_controller(workers = 1L)
  controller$push(command = { warning("careful"); stop("this is an error") }, name = "bad")
  controller$wait(mode = "one", seconds_timeout = 60)
  out <- controller$pop()
  expect_equal(nrow(out), 1L)
  expect_equal(out$status, "error")
  expect_equal(out$error, "this is an error")
  expect_equal(out$warnings, "careful")
  expect_equal(out$job_status, "failed")
  controller$push(command = stop("again"), name = "bad2")
  controller$wait(seconds_timeout = 60)
  expect_error(controller$pop(error = "stop"), "again", class = "crew_task_error")
})

test_that("a failing command carries its exit code and error", {
  controller <- local_controller(workers = 1L)
  controller$push(shell = "echo out; exit 3", name = "three")
  controller$wait(seconds_timeout = 60)
  out <- controller$pop()
  expect_equal(out$status, "error")
  expect_equal(out$code, 3L)
  expect_match(out$error, "status 3")
  expect_equal(out$result[[1]], "out\n")
  expect_equal(controller$logs("three")$stdout, "out\n")
  controller$push(shell = "mkdir -p fit && echo 42 > fit/model.txt", outputs = "fit/*", name = "fit")
  controller$wait(seconds_timeout = 60)
  expect_equal(controller$pop()$status, "success")
  to <- tempfile("fetched-")
  paths <- controller$fetch("fit", to = to)
  expect_length(paths, 1L)
  expect_equal(readLines(file.path(to, "fit", "model.txt")), "42")
})

test_that("saturated, summary and cancel", {
  controller <- local_controller(workers = 2L)
  expect_false(controller$saturated())
  controller$push(argv = c("sleep", "60"), name = "a")
  expect_false(controller$saturated())
  controller$push(argv = c("sleep", "60"), name = "b")
  expect_true(controller$saturated())
  expect_equal(controller$unresolved(), 2L)
  controller$cancel(all = TRUE)
  expect_true(controller$wait(seconds_timeout = 30))
  results <- controller$collect()
  expect_equal(sort(results$status), c("cancel", "cancel"))
  summary <- controller$summary()
  expect_equal(nrow(summary), 2L)
  expect_equal(summary$controller, c("crew", "crew"))
  expect_setequal(summary$worker, c("local-1", "local-2"))
  expect_equal(sum(summary$tasks) + sum(is.na(results$worker)), 2L)
})

test_that("the daemon's refusals are crew_api_error conditions with their code", {
  skip_without_crew()
  controller <- crew_controller_daemon(workers = 1L, class = "no-such-class", dir = project_dir())
  err <- tryCatch(controller$start(), crew_api_error = function(e) e)
  expect_s3_class(err, "crew_api_error")
  expect_equal(err$code, "unknown_class")
  expect_equal(err$status, 400L)
  expect_match(err$detail, "no-such-class")
  # The daemon that start() started for it is stopped again.
  expect_false(controller$started())
  expect_error(crew_api_request(file.path(controller$dir, "crew.sock"), "GET", "/v1/health"),
               class = "crew_daemon_error")
})

test_that("terminate stops the daemon that start started", {
  controller <- local_controller(workers = 1L)
  socket <- file.path(controller$dir, "crew.sock")
  pid <- crew_api_request(socket, "GET", "/v1/health")$pid
  controller$terminate()
  expect_false(controller$started())
  stat <- suppressWarnings(tryCatch(readLines(sprintf("/proc/%d/stat", pid)), error = function(e) character(0)))
  expect_true(length(stat) == 0L || grepl(") Z", stat[[1]], fixed = TRUE))
})

test_that("map runs an expression over iterate, in order, in one request", {
  controller <- local_controller(workers = 2L)
  controller$push(argv = c("echo", "left alone"), name = "other")
  out <- controller$map(
    command = x * k,
    iterate = list(x = 1:6, id = paste0("m", 1:6)),
    data = list(k = 10),
    names = "id"
  )
  expect_equal(out$name, paste0("m", 1:6))
  expect_equal(unlist(out$result), (1:6) * 10)
  expect_true(all(out$status == "success"))
  expect_error(controller$map(command = stop("no"), iterate = list(x = 1:2)), "no", class = "crew_task_error")
  # The pushed task is still there for pop().
  controller$wait(seconds_timeout = 30)
  expect_equal(controller$pop()$name, "other")
})
