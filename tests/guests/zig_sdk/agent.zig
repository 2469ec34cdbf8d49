//! The Zig SDK's behaviours the tests check: how it hands errors to agent code, how the
//! host reports the agent's own failures, values both ways, logging, the heap.
//! Input {"case": NAME}.
const std = @import("std");
const torpor = @import("torpor");

/// A larger Asyncify buffer than the 16 KiB default (the test reads it from the image).
pub const torpor_async_stack = 24 * 1024;

const Case = enum { denied, namespace, sleep, uncaught, unexpected, fail, panic, oom, recurse, deep_call, log, values, heap };

pub fn main() !void {
    const in = torpor.input(struct { case: Case, by: i64 = 1 }) catch
        return torpor.fail("input needs a \"case\"", .{});
    defer in.deinit();
    switch (in.value.case) {
        // kv.set is not granted: a typed error, and the host's object with its rule.
        .denied => {
            torpor.kv.set("k", .{ .x = 1 }) catch |err| return caught(err);
            return torpor.fail("kv.set was not denied", .{});
        },
        // kv.incr is granted, a namespace outside its grant is refused by a rule.
        .namespace => {
            _ = torpor.kv.incrIn("secret", "n", in.value.by) catch |err| return caught(err);
            return torpor.fail("the namespace was not denied", .{});
        },
        // A durable sleep is the timer.sleep tool, which this policy does not grant (the
        // test packs the module with one that does, too).
        .sleep => {
            torpor.sleep(@intCast(in.value.by)) catch |err| return caught(err);
            try torpor.output(.{ .slept = in.value.by });
        },
        // A tool error main does not catch: the run fails with agent_error, saying which.
        .uncaught => try torpor.kv.set("k", 1),
        // A result that does not parse as the type asked for.
        .unexpected => {
            _ = torpor.call(struct { value: []const u8 }, "kv.incr", .{ .key = "n", .by = in.value.by }) catch |err|
                return caught(err);
        },
        .fail => return torpor.fail("gave up at {d}", .{in.value.by}),
        // A safety check of ReleaseSafe: aborted, with Zig's message.
        .panic => {
            var x: u8 = 250;
            x += @intCast(in.value.by);
            try torpor.output(.{ .x = x });
        },
        // More than the 4 MiB budget: the grow is refused, main returns OutOfMemory.
        .oom => {
            const big = try torpor.allocator.alloc(u8, 64 << 20);
            big[0] = 1;
        },
        // Frames of 1 KiB on the shadow stack, 1,000 deep: past its 64 KiB.
        .recurse => try torpor.output(.{ .depth = down(@intCast(in.value.by)) }),
        // A tool call under `by` frames: past the Asyncify buffer when they are many.
        .deep_call => try torpor.output(.{ .value = try deepCall(@intCast(in.value.by)) }),
        .log => {
            std.log.info("through std.log: {d}", .{in.value.by});
            std.log.scoped(.steps).warn("scoped", .{});
            torpor.log(.debug, "direct {s}", .{"debug"});
            try torpor.output(.{ .logged = true });
        },
        // Values through kv and back: a shared namespace, an absent key, std.json.Value.
        .values => {
            const v = try torpor.kv.incrIn("team", "n", in.value.by);
            const absent = try torpor.kv.get(i64, "nothing");
            const any = try torpor.call(std.json.Value, "kv.incr", .{ .key = "m" });
            defer any.deinit();
            try torpor.output(.{ .team = v, .absent = absent == null, .m = any.value });
        },
        // The SDK's heap under churn: a growing list, blocks of many sizes freed and
        // taken again, an over-aligned block; the memory stays near what is live.
        .heap => {
            const a = torpor.allocator;
            var list: std.ArrayList(u64) = .empty;
            defer list.deinit(a);
            for (0..10_000) |i| try list.append(a, i * i);
            for (0..1_000) |r| {
                const b = try a.alloc(u8, (r * 37) % 5_000 + 1);
                @memset(b, @truncate(r));
                if (b[b.len - 1] != @as(u8, @truncate(r))) return torpor.fail("block {d} lost its bytes", .{r});
                a.free(b);
            }
            const page = try a.alignedAlloc(u8, .fromByteUnits(4096), 100);
            defer a.free(page);
            // What every tool call does (arguments written, a result parsed, both freed),
            // many times over: once warm, the memory must not grow at all.
            var grown: usize = 0;
            for (0..3) |round| {
                const before = @wasmMemorySize(0);
                for (0..300) |i| {
                    const args = try torpor.stringify(.{ .key = "counter", .by = i, .note = "a note of some length, so that the text takes a few size classes as it grows" });
                    defer a.free(args);
                    const parsed = try std.json.parseFromSlice(std.json.Value, a, args, .{});
                    parsed.deinit();
                }
                if (round > 0) grown += @wasmMemorySize(0) - before;
            }
            var sum: u64 = 0;
            for (list.items) |x| sum += x;
            try torpor.output(.{
                .sum = sum,
                .aligned = @intFromPtr(page.ptr) % 4096 == 0,
                .pages = @wasmMemorySize(0),
                .grown = grown,
            });
        },
    }
}

/// The error as agent code sees it: its name, and the host's object behind it; and
/// whether the heap is still sound after the failed call.
fn caught(err: torpor.CallError) !void {
    const f = torpor.lastFailure().?;
    const heap_ok = try heapSound();
    try torpor.output(.{
        .heap_ok = heap_ok,
        .err = @errorName(err),
        .is_denied = err == error.Denied,
        .tool = f.tool,
        .code = f.code,
        .message = f.message,
        .rule = f.rule,
        .reason_code = f.reason_code,
        .retryable = f.retryable,
    });
}

/// No two live blocks overlap: 64 blocks of each of several sizes, each filled with its
/// own byte and read back after all are filled (a slot freed twice would be handed out
/// twice, and one fill would overwrite the other).
fn heapSound() !bool {
    const a = torpor.allocator;
    const sizes = [_]usize{ 8, 24, 60, 100, 200, 300, 500, 1000, 3000 };
    var blocks: [sizes.len * 64][]u8 = undefined;
    for (&blocks, 0..) |*b, i| {
        b.* = try a.alloc(u8, sizes[i / 64]);
        @memset(b.*, @truncate(i));
    }
    var ok = true;
    for (blocks, 0..) |b, i| {
        for (b) |byte| ok = ok and byte == @as(u8, @truncate(i));
        a.free(b);
    }
    return ok;
}

noinline fn down(n: u64) u64 {
    var frame: [1024]u8 = undefined;
    @memset(&frame, @truncate(n));
    std.mem.doNotOptimizeAway(&frame);
    return if (n == 0) frame[0] else down(n - 1) + frame[1023];
}

noinline fn deepCall(n: u64) torpor.CallError!i64 {
    if (n == 0) return torpor.kv.incr("deep", 1);
    return (try deepCall(n - 1)) + 1;
}
