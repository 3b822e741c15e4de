//! builtins: functions compiled into the agent
