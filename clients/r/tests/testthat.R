library(testthat)
library(crewclient)

test_check("crewclient", stop_on_failure = TRUE)
